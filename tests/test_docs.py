"""The user documentation stays true to the CLI: generated pages are current, every command line
shown in the docs uses real commands and options, and relative links resolve."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
import typer.main

from geoexplora.cli import COMMANDS, app

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GENERATED = {"cli.md", "errors.md"}  # written by scripts from the code itself
GLOBAL_OPTIONS = {"-v", "-vv", "-vvv", "--verbose", "-q", "--quiet", "--version", "-h", "--help"}
UNCHECKED_BLOCKS = {"text", "json", "python"}  # program output and Python, not shell commands
FENCE = re.compile(r"^```(\S*)\s*$")
SUBSTITUTION = re.compile(r"\$\(\([^()]*\)\)|\$\([^()]*\)|\$\{[^}]*\}")
NUMBER = re.compile(r"^-\d")


def load_script(name: str):
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def code_blocks(text: str) -> list[tuple[str, list[str]]]:
    """``[(info string, lines)]`` of the fenced code blocks of a Markdown text."""
    blocks, current, info = [], None, ""
    for line in text.splitlines():
        match = FENCE.match(line.strip())
        if match and current is None:
            current, info = [], match.group(1)
        elif line.strip() == "```" and current is not None:
            blocks.append((info, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def shell_commands(lines: list[str]) -> list[str]:
    """The command lines of a shell block: the ``$ `` lines where the block shows a session with
    output, else every line; backslash continuations joined."""
    prompted = any(line.startswith("$ ") for line in lines)
    commands, pending = [], None
    for line in lines:
        if pending is not None:
            pending += " " + line.strip()
        elif prompted and not line.startswith("$ "):
            continue
        else:
            pending = line[2:] if prompted else line
        if pending.endswith("\\"):
            pending = pending[:-1]
        else:
            commands.append(pending)
            pending = None
    return commands


def geoexplora_invocations(command_line: str) -> list[list[str]]:
    """The argument lists of every ``geoexplora ...`` in a shell command line, up to the next
    shell operator (``|``, ``;``, ``&&``, ``>``, ...)."""
    lexer = shlex.shlex(SUBSTITUTION.sub("X", command_line), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    found = []
    for i, token in enumerate(tokens):
        if token == "geoexplora" or token.endswith("/geoexplora"):
            args = []
            for t in tokens[i + 1 :]:
                if t and set(t) <= set("|;&<>()"):
                    break
                args.append(t)
            found.append(args)
    return found


def documented_invocations() -> list[tuple[str, list[str]]]:
    found = []
    for path in doc_files():
        if path.name in GENERATED:
            continue
        for info, lines in code_blocks(path.read_text(encoding="utf-8")):
            if info in UNCHECKED_BLOCKS:
                continue
            for line in shell_commands(lines):
                found += [
                    (f"{path.name}: {line.strip()}", args) for args in geoexplora_invocations(line)
                ]
    return found


def unknown_names(args: list[str], group) -> list[str]:
    """Commands and options of one invocation the CLI does not have."""
    rest = list(args)
    while rest and rest[0] in GLOBAL_OPTIONS:
        rest.pop(0)
    if not rest:
        return []
    name, *rest = rest
    if name not in group.commands:
        return [f"command '{name}'"]
    command = group.get_command(None, name)  # with the options the CLI group adds to every verb
    known = {opt for param in command.params for opt in param.opts + param.secondary_opts}
    known |= {"-h", "--help"}
    options = [
        t.split("=", 1)[0] for t in rest if t.startswith("-") and t != "-" and not NUMBER.match(t)
    ]
    return [f"option '{o}' of {name}" for o in options if o not in known]


def test_docs_show_every_command():
    shown = {
        args[0] for _, args in documented_invocations() if args and args[0] not in GLOBAL_OPTIONS
    }
    assert set(COMMANDS) - shown == set()


@pytest.mark.parametrize(
    "where,args", documented_invocations(), ids=lambda v: v if isinstance(v, str) else None
)
def test_documented_command_lines_use_real_commands_and_options(where, args):
    assert unknown_names(args, typer.main.get_command(app)) == [], where


def test_option_check_catches_unknown_options_and_commands():
    group = typer.main.get_command(app)
    [args] = geoexplora_invocations("geoexplora -q predict m.pt x.tif --tile-size 5 -o y.tif | jq")
    assert unknown_names(args, group) == ["option '--tile-size' of predict"]
    [args] = geoexplora_invocations("srun geoexplora pretrain x")
    assert unknown_names(args, group) == ["command 'pretrain'"]
    [args] = geoexplora_invocations("geoexplora tile a.tif --nodata -9999 --size=28 -o c/ && ls")
    assert unknown_names(args, group) == []


def test_cli_reference_is_current():
    current = (DOCS / "cli.md").read_text(encoding="utf-8") if (DOCS / "cli.md").exists() else ""
    assert current == load_script("gen_cli_reference").render() + "\n", (
        "docs/cli.md is stale: run `make docs`"
    )


def test_error_catalogue_is_current():
    current = (DOCS / "errors.md").read_text(encoding="utf-8")
    assert current == load_script("gen_error_catalog").render(), (
        "docs/errors.md is stale: run `python scripts/gen_error_catalog.py > docs/errors.md`"
    )


def test_error_catalogue_shows_fields_branches_and_exit_codes(tmp_path):
    package = tmp_path / "pkg"
    (package / "io").mkdir(parents=True)
    (package / "io" / "scene.py").write_text(
        '"""Scenes."""\n'
        "def read(path, bands):\n"
        "    if not path:\n"
        "        raise UserError(f'{path}: has no CRS; bands {\", \".join(bands)}')\n"
        "    if bands:\n"
        "        raise UserError(f\"{path}: no chips{f' in {bands}' if bands else ''}\")\n"
        "    raise RuntimeFailure('ran out ' + 'of memory')\n"
        "class Stopped(RuntimeFailure):\n"
        '    """Ctrl-C."""\n'
        "    exit_code = 130\n"
        "class Reader:\n"
        "    def go(self, step):\n"
        "        raise Stopped(f'stopped at {step}')\n"
        "        raise ValueError('not a CLI error')\n"
    )
    catalog = load_script("gen_error_catalog")
    sites = catalog.collect(package)
    assert [(s.module, s.function, s.kind, s.template) for s in sites] == [
        ("pkg.io.scene", "read", "UserError", "{path}: has no CRS; bands {', '.join(bands)}"),
        ("pkg.io.scene", "read", "UserError", "{path}: no chips in {bands}"),
        ("pkg.io.scene", "read", "UserError", "{path}: no chips"),
        ("pkg.io.scene", "read", "RuntimeFailure", "ran out of memory"),
        ("pkg.io.scene", "Reader.go", "Stopped", "stopped at {step}"),
    ]
    text = catalog.render(package)
    assert "## pkg.io.scene\n\nScenes.\n" in text
    assert "- `ran out of memory`: RuntimeFailure, exit 1; in `read`" in text
    assert "- **Stopped** (exit code 130): Ctrl-C. 1 message." in text
    assert "- `stopped at {step}`: Stopped, exit 130; in `Reader.go`" in text


def test_error_catalogue_covers_the_package():
    sites = load_script("gen_error_catalog").collect()
    messages = {s.template for s in sites}
    assert "{path} exists; pass --overwrite to replace it" in messages
    assert len(sites) > 100


def test_relative_links_resolve():
    broken = []
    for path in doc_files():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if "://" not in target and not (path.parent / target).exists():
                broken.append(f"{path.name} -> {target}")
    assert broken == []


def test_recipe_page_is_current_and_lists_every_default():
    current = (DOCS / "recipe.md").read_text(encoding="utf-8")
    assert current == load_script("gen_recipe").render(), (
        "docs/recipe.md is stale: run `python scripts/gen_recipe.py > docs/recipe.md`"
    )
    from geoexplora import defaults

    for section in (
        "ENGINE",
        "EXPLORA",
        "DATA",
        "DINOV2",
        "MAE",
        "FINETUNE",
        "PROBE",
        "TILE",
        "PREDICT",
    ):
        assert f"## `{section}`" in current
    assert f"| `lora_rank` | `{defaults.EXPLORA.lora_rank}` | recipe |" in current
