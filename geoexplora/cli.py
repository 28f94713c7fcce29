"""The ``geoexplora`` command line: a thin Typer layer over the library.

Exit codes: 0 success, 2 bad usage or bad input (one line naming the file/band/option), 1 runtime
failure. ``-v`` shows tracebacks. Heavy packages are imported inside commands only.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from typing import Annotated

import typer
from typer.core import TyperGroup

from geoexplora import __version__
from geoexplora.commands._options import QUIET_HELP, VERBOSE_HELP


class _Group(TyperGroup):
    """Options every verb has, added here once: -v/-q after the verb's name too (users type both
    orders), --config FILE.yaml and --print-config; the experiment trackers for training verbs."""

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is not None and not any(p.name == "quiet" for p in command.params):
            from functools import partial

            from geoexplora.commands._options import (
                TRACKED_VERBS,
                config_options,
                run_or_print_config,
                tracker_options,
                verbosity_options,
            )

            command.params[:0] = config_options()  # first, so --config is read before the rest
            if cmd_name in TRACKED_VERBS:
                command.params.extend(tracker_options())
            command.params.extend(verbosity_options())
            command.invoke = partial(run_or_print_config, command.invoke)
        return command


app = typer.Typer(
    cls=_Group,
    name="geoexplora",
    help="ExPLoRA for satellite imagery: adapt a natural-image ViT to your scenes, then probe, "
    "fine-tune and predict georeferenced rasters.\n\n"
    "Example: geoexplora adapt --bands B2,B3,B4,B8 ./scenes -o adapted.pt",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

# One module per command, in pipeline order; each module has ``register(app)``.
COMMANDS = (
    "info",
    "tile",
    "adapt",
    "probe",
    "finetune",
    "predict",
    "embed",
    "demo",
    "models",
    "export",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"geoexplora {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help=VERBOSE_HELP)] = 0,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help=QUIET_HELP)] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    from geoexplora.log import set_verbosity

    set_verbosity(-1 if quiet else verbose)


for _name in COMMANDS:
    if importlib.util.find_spec(f"geoexplora.commands.{_name}") is not None:
        importlib.import_module(f"geoexplora.commands.{_name}").register(app)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is: it unwinds like Ctrl-C (temporary outputs removed,
    what is resumable kept) and exits 130 with one line."""


_SIGNALLED: list[str] = []  # the signal that ended this run, for its one line


def _terminate(signum, _frame) -> None:
    _SIGNALLED.append(signal.Signals(signum).name)
    raise Terminated(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: maps our exceptions to exit codes and one-line messages."""
    from typer.exceptions import TyperException  # click's ClickException (usage errors)

    # SIGTERM (kill, SLURM pre-emption) unwinds like Ctrl-C, so temporary outputs are removed;
    # training installs its own handler that checkpoints first.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)

    from geoexplora.errors import RuntimeFailure, UserError, raise_storage_failure
    from geoexplora.log import verbosity

    _SIGNALLED.clear()
    try:
        try:
            result = app(args=argv, prog_name="geoexplora", standalone_mode=False)
        except OSError as exc:
            raise_storage_failure(exc)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except TyperException as exc:
        ctx = getattr(exc, "ctx", None)
        if not exc.format_message() and ctx is not None:  # no arguments at all: show the help
            sys.stdout.write(ctx.get_help() + "\n")
            return exc.exit_code
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        sys.stderr.write(f"geoexplora: error: {exc.format_message()}{hint}\n")
        return exc.exit_code
    except typer.Abort:
        sys.stderr.write("geoexplora: aborted\n")
        return 130
    except (UserError, RuntimeFailure) as exc:
        if verbosity() > 0:
            import traceback

            traceback.print_exc()
        from geoexplora.errors import cli_flag

        text = exc.render(cli_flag)
        message = text.splitlines()[0] if text else type(exc).__name__
        sys.stderr.write(f"geoexplora: error: {message}\n")
        return exc.exit_code
    if result == 130:  # typer turns KeyboardInterrupt (Ctrl-C, or SIGTERM above) into 130
        how = f" ({_SIGNALLED.pop()})" if _SIGNALLED else ""
        sys.stderr.write(f"geoexplora: interrupted{how}\n")
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
