"""Writes the CLI reference (docs/cli.md) from the Typer app, so it cannot drift from --help.

Usage: python scripts/gen_cli_reference.py > docs/cli.md   (or `make docs`);
tests/test_docs.py fails when docs/cli.md is stale.
"""

from __future__ import annotations

import typer.main

from geoexplora.cli import app


def _option_rows(command) -> list[str]:
    rows = []
    for param in command.params:
        if param.param_type_name == "argument":
            name = param.name.upper()
            rows.append(
                f"| `{name}` | argument{'s' if param.nargs != 1 else ''} | "
                f"{(getattr(param, 'help', None) or '').replace('|', '/')} |"
            )
            continue
        names = ", ".join(f"`{o}`" for o in param.opts + param.secondary_opts)
        default = (
            ""
            if param.default in (None, False, ()) or (param.is_flag and not param.default)
            else f" (default: {param.default})"
        )
        help_text = (param.help or "").replace("|", "/").replace("\\[", "[").replace("\n", " ")
        rows.append(f"| {names} | option | {help_text}{default} |")
    return rows


def render() -> str:
    group = typer.main.get_command(app)
    lines = [
        "# CLI reference",
        "",
        "Generated from the Typer app by `scripts/gen_cli_reference.py` (`make docs`); do not",
        "edit by hand.",
        "",
        "```",
        "geoexplora [-v|-q] [--version] COMMAND ...",
        "```",
        "",
    ]
    for name in app_command_order(group):
        command = group.get_command(None, name)  # with the options the group adds to every verb
        lines += [
            f"## geoexplora {name}",
            "",
            (command.help or "").strip(),
            "",
            "| name | kind | help |",
            "|---|---|---|",
            *_option_rows(command),
            "",
        ]
    return "\n".join(lines)


def app_command_order(group) -> list[str]:
    from geoexplora.cli import COMMANDS

    names = list(group.commands)
    return sorted(names, key=lambda n: COMMANDS.index(n) if n in COMMANDS else len(COMMANDS))


if __name__ == "__main__":
    print(render())
