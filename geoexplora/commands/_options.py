"""Options shared by several commands, defined once."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

Bands = Annotated[
    str | None,
    typer.Option(
        "--bands",
        help="Bands to use, in this order, by name: e.g. B2,B3,B4,B8 (aliases like B02, "
        "blue, nir work).",
    ),
]
Sensor = Annotated[
    str | None,
    typer.Option(
        "--sensor",
        help="Sensor preset naming the file's bands in order when it has no band "
        "descriptions: sentinel2, landsat8, landsat9, landsat7, landsat5, rgb, rgbn.",
    ),
]
BandMap = Annotated[
    str | None,
    typer.Option(
        "--band-map",
        help="Explicit band identities of the file's bands, 1-based: 1=B2,2=B3,3=B4 "
        "(with --sensor), or sensor-qualified 1=sentinel2:B2; FILE:1=B7 for one "
        "file of several.",
    ),
]
S2Offset = Annotated[
    str,
    typer.Option(
        "--s2-offset",
        help="Sentinel-2 DN offset: auto (1000 from 2022-01-25, or from tags), 0 or 1000.",
    ),
]
Resolution = Annotated[
    float | None,
    typer.Option(
        "--resolution", help="Target pixel size in CRS units (default: the finest input)."
    ),
]
Nodata = Annotated[
    float | None,
    typer.Option("--nodata", help="Nodata value overriding the file's (NaN is always nodata)."),
]
Dates = Annotated[
    str | None,
    typer.Option(
        "--dates",
        help="Comma-separated dates (YYYY-MM-DD), one per input file, when files carry none.",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print results as one JSON document on stdout.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
Init = Annotated[
    str | None,
    typer.Option(
        "--init",
        help="Initial model: a timm name (vit_small_patch14_dinov2.lvd142m), "
        "torchgeo:ENUM, hf-hub:ORG/NAME, or a geoexplora model file.",
    ),
]
InitWeights = Annotated[
    str | None,
    typer.Option(
        "--init-weights",
        help="A local checkpoint for --init's architecture (Meta DINOv2 .pth, timm "
        ".safetensors/.pth, MAE), or 'random' for an explicit random init.",
    ),
]
Device = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda or cuda:N (default: cuda when available).")
]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
NumWorkers = Annotated[int, typer.Option("--num-workers", help="Data-loading worker processes.")]
CreationOptions = Annotated[
    list[str] | None,
    typer.Option("--co", help="GDAL creation option KEY=VALUE for output rasters (repeatable)."),
]


StacSearch = Annotated[
    str | None,
    typer.Option(
        "--stac-search",
        rich_help_panel="STAC search",
        help="A STAC API URL: its search's items are inputs too (each item one scene of its band "
        "assets).",
    ),
]
Collection = Annotated[
    list[str] | None,
    typer.Option(
        "--collection",
        rich_help_panel="STAC search",
        help="The collection to search (repeatable), e.g. sentinel-2-l2a.",
    ),
]
Bbox = Annotated[
    str | None,
    typer.Option("--bbox", rich_help_panel="STAC search", help="Search area W,S,E,N in lon/lat."),
]
Datetime = Annotated[
    str | None,
    typer.Option(
        "--datetime",
        rich_help_panel="STAC search",
        help="Search dates: 2023-06-01/2023-06-30, 2023-06, or one date.",
    ),
]
MaxItems = Annotated[
    int,
    typer.Option(
        "--max-items", rich_help_panel="STAC search", help="Most items the search returns."
    ),
]


def _path_or_uri(text: str) -> Path | str:
    """A local name as a Path; a URI (https://, s3://, /vsicurl/...) kept as the string given."""
    from geoexplora.io.remote import is_uri

    return text if is_uri(text) else Path(text)


def expand_paths(items: list[str]) -> list[Path | str]:
    """Positional inputs: '-' reads one path per line from stdin (for shell pipelines). URIs
    stay strings (a Path would fold https:// into https:/)."""
    out: list[Path | str] = []
    for item in items:
        if item == "-":
            out.extend(_path_or_uri(line.strip()) for line in sys.stdin if line.strip())
        else:
            out.append(_path_or_uri(item))
    return out


def inputs_with_search(
    items: list[str] | None,
    stac_search: str | None,
    collection: list[str] | None,
    bbox: str | None,
    datetime: str | None,
    max_items: int,
) -> list:
    """The positional inputs (:func:`expand_paths`), then the items a --stac-search returns."""
    from geoexplora.errors import UserError

    out: list = expand_paths(list(items or []))
    if stac_search:
        from geoexplora.io import stac
        from geoexplora.validate import require_positive

        require_positive("--max-items", max_items)
        out.extend(stac.search(stac_search, collection, stac.parse_bbox(bbox), datetime, max_items))
    elif collection or bbox or datetime:
        raise UserError("--collection, --bbox and --datetime filter a --stac-search; pass one")
    if not out:
        raise UserError("no inputs: name scenes (files, URIs, STAC items) or pass --stac-search")
    return out


def parse_creation_options(items: list[str] | None) -> dict[str, str]:
    from geoexplora.errors import UserError

    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"--co '{item}' is not KEY=VALUE")
        out[key.strip().upper()] = value.strip()
    return out


def print_json(doc) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def scene_opts(**kwargs):
    """SceneOptions from CLI strings (imports rasterio lazily)."""
    from geoexplora.io.scene import scene_options

    return scene_options(**kwargs)


VERBOSE_HELP = "More logging (-v), tracebacks on errors."
QUIET_HELP = "Errors only; no progress."


def _add_verbose(count: int) -> None:
    """-v after the verb adds to any -v given before it (the group's callback has already run)."""
    if count:
        from geoexplora.log import set_verbosity, verbosity

        set_verbosity(max(verbosity(), 0) + count)


def _set_quiet(quiet: bool) -> None:
    if quiet:
        from geoexplora.log import set_verbosity

        set_verbosity(-1)


def verbosity_options() -> list:
    """-v/-q as options of a verb, so `geoexplora predict ... -q` works as `geoexplora -q
    predict ...` does. Built by Typer from a signature (so they parse and render like every other
    option) and not passed to the verb's function: their callbacks set the logging state."""

    def verbosity(
        verbose: Annotated[
            int,
            typer.Option(
                "-v",
                "--verbose",
                count=True,
                callback=_add_verbose,
                help=VERBOSE_HELP,
                rich_help_panel=LOGGING_PANEL,
            ),
        ] = 0,
        quiet: Annotated[
            bool,
            typer.Option(
                "-q", "--quiet", callback=_set_quiet, help=QUIET_HELP, rich_help_panel=LOGGING_PANEL
            ),
        ] = False,
    ) -> None:
        """Never run: only its parameters are used."""

    params = _params_of(verbosity)
    for param in params:
        param.expose_value = False
    return params


# The help panels of the options the CLI group adds to the verbs.
CONFIG_PANEL = "Run configuration"
TRACKING_PANEL = "Experiment tracking"
LOGGING_PANEL = "Logging"


def _params_of(signature) -> list:
    """The click parameters Typer builds from a function's signature (the function never runs):
    how the group's shared options parse and render like every verb's own."""
    app = typer.Typer(add_completion=False)
    app.command()(signature)
    return typer.main.get_command(app).params


def _config_keys(command) -> dict:
    """The keys a verb's config file may hold: the verb's own parameters (one schema source)."""
    return {
        p.name: p
        for p in command.params
        if p.expose_value and p.name not in ("help", "config", "print_config")
    }


def _load_config(ctx: typer.Context, path: Path | None) -> None:
    """--config FILE.yaml: the file's values become the verb's defaults (click's default_map),
    so flags given on the command line override them; each value is checked by the option's own
    type."""
    if path is None:
        return
    import yaml

    from geoexplora.errors import UserError

    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise UserError(f"--config {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path}: not YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(doc, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values")
    keys = _config_keys(ctx.command)
    for key, value in doc.items():
        param = keys.get(str(key).replace("-", "_"))
        if param is None:
            raise UserError(
                f"{path}: unknown key '{key}' for '{ctx.command_path}' (see --print-config)"
            )
        if value is None:
            continue
        try:  # the conversion click applies to the option's own values
            param.get_runtime_param().coerce(value, param=param, ctx=ctx)
        except typer.BadParameter as exc:
            raise UserError(f"{path}: key '{key}': {exc.message}") from exc
    ctx.default_map = {str(k).replace("-", "_"): v for k, v in doc.items()}


def _plain(value):
    """A resolved parameter value as YAML-safe data (paths and enums as strings)."""
    from enum import Enum

    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def resolved_config(ctx) -> dict:
    """Every parameter of the verb as resolved (file, flags and defaults), as --config reads it."""
    keys = _config_keys(ctx.command)
    return {name: _plain(ctx.params[name]) for name in keys if name in ctx.params}


def config_options() -> list:
    """--config and --print-config for every verb (added by the CLI group, like -v/-q)."""

    def config(
        config: Annotated[
            Path | None,
            typer.Option(
                "--config",
                callback=_load_config,
                is_eager=True,
                metavar="FILE.yaml",
                rich_help_panel=CONFIG_PANEL,
                help="Read option values from a YAML file (keys as in --print-config); flags given "
                "on the command line override it.",
            ),
        ] = None,
        print_config: Annotated[
            bool,
            typer.Option(
                "--print-config",
                rich_help_panel=CONFIG_PANEL,
                help="Print the fully resolved options as YAML (readable by --config) and exit "
                "without running.",
            ),
        ] = False,
    ) -> None:
        """Never run: only its parameters are used."""

    params = _params_of(config)
    for param in params:
        param.expose_value = False
    params[1].expose_value = True  # read by the group's wrapper around the verb
    return params


TRACKED_VERBS = ("adapt", "finetune", "probe")  # verbs whose records or scores trackers get
LOOP_VERBS = ("adapt", "finetune")  # their training loop's PNGs lie next to the output
TRACKER_PARAMS = ("logger", "run_name", "log_dir")


def tracker_options() -> list:
    """--logger/--run-name/--log-dir for the tracked verbs (added by the CLI group)."""
    from geoexplora import defaults

    def trackers(
        logger: Annotated[
            list[str] | None,
            typer.Option(
                "--logger",
                rich_help_panel=TRACKING_PANEL,
                help="Also log the run to an experiment tracker: csv, tensorboard, mlflow or wandb "
                "(repeatable; all but csv are extras, e.g. pip install "
                "'geoexplora\\[tensorboard]').",
            ),
        ] = None,
        run_name: Annotated[
            str | None,
            typer.Option(
                "--run-name",
                rich_help_panel=TRACKING_PANEL,
                help="The run's name in the trackers (default: the output's stem, or the verb's "
                "name).",
            ),
        ] = None,
        log_dir: Annotated[
            Path,
            typer.Option(
                "--log-dir", rich_help_panel=TRACKING_PANEL, help="Folder for the trackers' files."
            ),
        ] = Path(defaults.TRACKER_LOG_DIR),
    ) -> None:
        """Never run: only its parameters are used."""

    return _params_of(trackers)


def _tracking(ctx, config: dict):
    """The trackers asked for, popped from the verb's parameters (the verb does not take them)."""
    from geoexplora.train.tracking import tracking

    names, run_name, log_dir = (ctx.params.pop(name, None) for name in TRACKER_PARAMS)
    output = next((ctx.params[name] for name in OUTPUT_PARAMS if ctx.params.get(name)), None)
    run_name = run_name or (Path(output).stem if output else ctx.info_name)
    return tracking(list(names or []), run_name, Path(log_dir or "."), config)


OUTPUT_PARAMS = ("output",)  # the verbs' -o: a file, or a folder (tile, demo)


def config_sidecar(output: Path) -> Path:
    """Where a run's resolved config is kept: OUT-stem.config.yaml next to the output."""
    return output.with_name(f"{output.stem}.config.yaml")


def _config_yaml(ctx) -> str:
    import yaml

    from geoexplora import __version__

    header = (
        f"# {ctx.command_path} (geoexplora {__version__}): resolved options; rerun with "
        f"{ctx.command_path} --config THIS_FILE\n"
    )
    return header + yaml.safe_dump(resolved_config(ctx), sort_keys=False)


def run_or_print_config(invoke, ctx):
    """The verb's invoke, then its resolved config next to its output; with --print-config only
    the config, as YAML on stdout. Written after the run succeeded, so a failed run leaves none."""
    if ctx.params.pop("print_config", False):
        sys.stdout.write(_config_yaml(ctx))
        return 0
    from geoexplora.log import library_messages_logged
    from geoexplora.runconfig import running_with

    text = _config_yaml(ctx)  # before the verb runs: what was asked for, not what it changed
    config = resolved_config(ctx)
    output = next((ctx.params[name] for name in OUTPUT_PARAMS if ctx.params.get(name)), None)
    with (
        library_messages_logged(),
        _tracking(ctx, config),
        running_with({"command": ctx.info_name, "options": config}),
    ):
        result = invoke(ctx)
        if output is not None and ctx.info_name in LOOP_VERBS:
            from geoexplora.train.tracking import log_images

            output = Path(output)
            log_images(sorted(output.parent.glob(f"{output.stem}.*.png")))
    if output is not None and Path(output).exists() and not ctx.params.get("dry_run"):
        from geoexplora.io.outputs import atomic_output

        with atomic_output(config_sidecar(Path(output)), overwrite=True) as tmp:
            tmp.write_text(text)
    return result
