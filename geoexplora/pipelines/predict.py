"""``predict``: georeferenced rasters from a model file, windowed, blended and
streamed to disk in bounded memory.

``predict(PredictConfig(...))`` is what the CLI calls (``embed`` shares its job set-up). The engine
(``geoexplora.inference``) is independent of model files: ``predict_scene`` takes any
:class:`~geoexplora.inference.model.Predictor`.

Inputs: all rasters form one scene (bands in several files, or several dates), unless the output
is a folder (``-o outdir/``, or an existing folder): then each input (a file, or a folder holding
one scene) is predicted on its own into ``outdir/<name>.tif``.

Nodata policy: windows without a valid pixel are skipped; invalid pixels get zero blending
weight and are nodata in every output. A raster with no valid pixel at all still gets its
(all-nodata, georeferenced) outputs, so tiled pipelines keep a complete set of tiles, plus a
warning; the result reports ``valid_pixels: 0`` and the exit code is 0, since the output is
written and correct.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

from geoexplora.config_checks import one_of, path_list, scene_options
from geoexplora.defaults import PREDICT
from geoexplora.errors import UserError, opt
from geoexplora.inference.products import ProbDtype
from geoexplora.inference.windows import Blend
from geoexplora.io.outputs import check_not_input, check_output
from geoexplora.log import Progress, logger, reports_progress
from geoexplora.provenance import package_versions
from geoexplora.results import RasterResult

# Defaults of predict/embed (kept here: this module owns them).


@dataclass
class RasterJobConfig:
    """What ``predict`` and ``embed`` share: a model run over rasters, window by window, into
    COGs. ``model``: a model file, or a model loaded by
    :func:`geoexplora.models.file.load_model` (it carries its ``meta``). ``inputs``: raster
    paths, folders, globs (:mod:`geoexplora.io.inputs`), or one open
    :class:`~geoexplora.io.scene.Scene` (then ``scene`` options do not apply). The fields after
    ``output`` are keyword-only."""

    model: str | os.PathLike | Any
    inputs: list[str | os.PathLike] | list[Any]
    output: str | Path  # a file, or a folder (trailing "/" or existing) for one output per scene
    _: KW_ONLY
    window: int | None = None  # default: the model's image size
    overlap: int | None = None  # default: see PredictConfig / EmbedConfig
    batch_size: int = PREDICT.batch_size
    blend: Blend = PREDICT.blend
    creation_options: dict = field(default_factory=dict)
    dry_run: bool = False
    resume: bool = False
    shard: str | None = None  # "I/N"
    overwrite: bool = False
    device: str | None = None
    devices: str | None = None
    scene: Any = None  # geoexplora.io.scene.SceneOptions, or a dict of its fields
    prefetch: int = PREDICT.prefetch
    progress: Progress = True  # False, or a callback (see geoexplora.log)

    def __post_init__(self):
        check_common(self)


@dataclass
class PredictConfig(RasterJobConfig):
    """``geoexplora predict MODEL INPUTS -o OUTPUT`` (the shared fields: :class:`RasterJobConfig`).
    ``overlap`` defaults to window/4 (segmentation), window/2 (``dense``), 0 (grid)."""

    probabilities: bool = False
    prob_dtype: ProbDtype = "float32"
    uncertainty: bool = False
    vectorize: Path | None = None
    dense: bool = False

    def __post_init__(self):
        super().__post_init__()
        one_of("prob_dtype", self.prob_dtype, ProbDtype)


def check_common(cfg) -> None:
    """The checks predict's and embed's configurations share (normalising ``inputs`` and
    ``scene`` in place)."""
    from geoexplora.io.scene import Scene

    if isinstance(cfg.inputs, Scene):
        cfg.inputs = [cfg.inputs]
    cfg.inputs = path_list("inputs", cfg.inputs)
    if any(isinstance(i, Scene) for i in cfg.inputs) and (
        len(cfg.inputs) != 1 or output_is_folder(cfg.output)
    ):
        raise UserError("an open Scene is predicted alone, into one output file", option="inputs")
    one_of("blend", cfg.blend, Blend)
    cfg.scene = scene_options("scene", cfg.scene)
    from geoexplora.io.creation_options import check_creation_options

    check_creation_options(cfg.creation_options, "COG")  # the outputs are COGs (io/writers.py)


# --- jobs: which inputs go to which output --------------------------------------------------


def output_is_folder(output: str | Path) -> bool:
    return str(output).endswith(("/", os.sep)) or Path(output).is_dir()


def plan_jobs(rasters: list, output: str | Path, shard) -> list[tuple[list, Path]]:
    """``[(one scene's inputs, output path)]``: the inputs' places (:mod:`geoexplora.io.inputs`),
    one output each in a folder ``output``, or the one place into the file ``output``. With
    several jobs a shard takes every n-th one. ``output`` as given: a trailing ``/`` marks a
    folder that does not exist yet."""
    from geoexplora.io.inputs import place_name, resolve_places
    from geoexplora.io.scene import Scene

    if not rasters:
        raise UserError("no input rasters given")
    if len(rasters) == 1 and isinstance(rasters[0], Scene):
        return [(list(rasters), Path(output))]
    places = resolve_places(rasters)
    if not output_is_folder(output):
        if len(places) > 1:
            raise UserError(
                f"the inputs are {len(places)} places (footprints that do not "
                f"overlap: {', '.join(place_name(g) for g in places.groups)}); give "
                "a folder (ending in /) for one output per place",
                option="output",
            )
        return [(list(places.groups[0]), Path(output))]
    folder = Path(output)
    jobs = [(list(group), folder / f"{place_name(group)}.tif") for group in places.groups]
    names = [o for _, o in jobs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"two places would both write {dup}; give them distinct names")
    if shard:
        i, n = shard
        jobs = jobs[i::n]
    return jobs


def open_model_scene(paths: list[Path], scene_opts, meta: dict, model_name: str):
    """Open the inputs and keep the model's bands, in the model's order (by band identity, so a
    file's band order never matters); UserError naming what is missing."""
    from geoexplora.io.scene import Scene, SceneOptions, open_scene
    from geoexplora.models.file import check_scene_against_model

    if len(paths) == 1 and isinstance(paths[0], Scene):
        scene = paths[0]
    else:
        scene = open_scene(paths, scene_opts or SceneOptions())
    read = check_scene_against_model(meta, scene, model_name)
    sources = [[frame[i] for i in read.band_indices] for frame in scene.sources]
    warn_byte_scale(sources[0], meta["backbone"]["stats"]["mean"], model_name)
    mapping = [
        {
            "model_band": b.key,
            "file": str(s.path),
            "file_band": s.index,
            "date": s.date,
            "scale": s.scale,
            "add": s.add,
        }
        for frame in sources
        for b, s in zip(read.bands, frame)
    ]
    return Scene(sources, scene.grid, scene.dates), read, mapping


def warn_byte_scale(sources, model_mean: list[float], model_name: str) -> None:
    """Warn (once per scene) when 8-bit bands, read as they are, meet a model whose training
    mean for them is above 255: values no 8-bit band holds, so the file is most likely on
    another scale (reflectance x 255 from an RGB export, say) and the output nonsense."""
    import rasterio

    dtypes: dict = {}
    off = []
    for source, mean in zip(sources, model_mean):
        if source.path not in dtypes:
            with rasterio.open(source.path) as src:
                dtypes[source.path] = src.dtypes
        if (
            dtypes[source.path][source.index - 1] == "uint8"
            and source.scale == 1
            and source.add == 0
            and mean > 255
        ):
            off.append(f"{source.band.name} {mean:.0f}")
    if off:
        logger.warning(
            "%s: 8-bit band(s) read as they are, but %s was trained on means above "
            "255 (%s); if the file holds reflectance x 255, rescale it to the "
            "model's units first (e.g. gdal_translate -ot UInt16 -scale 0 255 0 "
            "10000)",
            sources[0].path.name,
            model_name,
            ", ".join(off),
        )


# --- the plan ---------------------------------------------------------------------------------


def _default_overlap(window: int, multiple: int, dense_classification: bool, grid: bool) -> int:
    if grid:
        return 0
    share = window // 2 if dense_classification else window // 4
    return share // multiple * multiple


def make_plan(scene, predictor, window: int | None, overlap: int | None, dense: bool):
    from geoexplora.inference.windows import WindowPlan
    from geoexplora.validate import given_or, require_at_least

    window = given_or(window, predictor.window)
    require_at_least("--window", window, predictor.patch_size)
    if window % predictor.patch_size:
        raise UserError(
            f"{opt('window')} {window} must be a multiple of the model's patch size "
            f"({predictor.patch_size})"
        )
    grid = predictor.per_window and not dense
    factor = predictor.patch_size if predictor.task == "embedding" else 1
    if overlap is None:
        overlap = _default_overlap(window, factor, predictor.per_window and dense, grid)
    if overlap < 0 or overlap >= window:
        raise UserError(f"{opt('overlap')} {overlap} must be in [0, {window})")
    if grid:
        return WindowPlan.grid(scene.height, scene.width, window, overlap)
    return WindowPlan.dense(scene.height, scene.width, window, overlap, factor)


def output_grid(scene, plan) -> dict:
    from rasterio.transform import Affine

    return {
        "crs": scene.crs,
        "transform": scene.transform @ Affine.scale(plan.factor),
        "width": plan.out_width,
        "height": plan.out_height,
    }


def memory_estimate(
    scene, plan, predictor, products, batch_size: int, prefetch: int, n_devices: int, votes: bool
) -> dict:
    """Bytes held at once, by part (the model's activations are a rough estimate)."""
    from geoexplora.io.writers import STRIP_ROWS

    t, c = len(scene.dates), len(scene.bands)
    k = predictor.channels
    window_bytes = t * c * plan.window**2 * 4
    acc = (k * (2 if votes else 1) + 1) * plan.tile_out_size * plan.out_width * 4
    strips = sum(p.spec.count * STRIP_ROWS * plan.out_width * 4 for p in products)
    render = 3 * k * plan.tile_out_size * plan.out_width * 4
    inputs = (prefetch + 2 * n_devices + 1) * batch_size * window_bytes
    arch = predictor.meta.get("backbone", {}).get("architecture", {})
    dim = int(arch.get("embed_dim", 768))
    tokens = t * (plan.window // predictor.patch_size) ** 2 + 1
    activations = batch_size * tokens * dim * 4 * 12 + batch_size * k * plan.window**2 * 4 * 3
    parts = {
        "accumulator": acc,
        "strip_buffers": strips + render,
        "input_prefetch": inputs,
        "model_activations_per_device": activations,
    }
    return {**{f"{k}_bytes": v for k, v in parts.items()}, "total_bytes": sum(parts.values())}


# --- one scene --------------------------------------------------------------------------------


def job_fingerprint(model_sha: str, inputs: list[Path], plan, settings: dict) -> dict:
    from geoexplora.io.remote import is_uri

    files = []
    for p in input_files(inputs):
        if is_uri(p):  # a remote file: its URI (no stat without a request)
            files.append({"path": str(p)})
            continue
        st = Path(p).stat()
        files.append(
            {"path": str(Path(p).resolve()), "size": st.st_size, "mtime": int(st.st_mtime)}
        )
    return {"model_sha256": model_sha, "inputs": files, "plan": plan.describe(), **settings}


def predict_scene(
    scene,
    predictor,
    plan,
    products,
    devices,
    run_opts,
    fingerprint: dict,
    provenance: dict,
    votes: bool = False,
    prepared: bool = False,
) -> dict:
    """Run the engine over a scene into ``products`` (see ``inference.runner.run_to_files``)."""
    from geoexplora.inference.runner import prepare_work, run_to_files

    if not prepared:
        prepare_work(products[0].path, fingerprint, run_opts)
    forwards = [(predictor.make_forward(d), d) for d in devices]
    return run_to_files(
        scene, plan, forwards, predictor.channels, products, run_opts, provenance, votes=votes
    )


def _run_options(cfg, shard):
    from geoexplora.inference.runner import RunOptions
    from geoexplora.inference.windows import BLENDS

    if cfg.blend not in BLENDS:
        raise UserError(f"{opt('blend')} must be one of {', '.join(BLENDS)}, not '{cfg.blend}'")
    if cfg.batch_size < 1:
        raise UserError(f"{opt('batch_size')} must be at least 1")
    return RunOptions(
        blend=cfg.blend,
        batch_size=cfg.batch_size,
        prefetch=cfg.prefetch,
        resume=cfg.resume,
        shard=shard,
        overwrite=cfg.overwrite,
        creation_options=dict(cfg.creation_options),
    )


def check_outputs(products, cfg, extra: list[Path], inputs: list[Path]) -> None:
    """Every file the job writes is new (or ``--overwrite``) and none is one it reads."""
    from geoexplora.inference.runner import sidecar_path

    paths = [p.path for p in products] + [sidecar_path(products[0].path)] + extra
    model_file = [cfg.model] if isinstance(cfg.model, (str, os.PathLike)) else []
    check_not_input(paths, [*input_files(inputs), *model_file])
    for path in paths:
        check_output(path, cfg.overwrite)


def dry_run_doc(
    inputs, output, scene, plan, predictor, products, mapping, cfg, devices, votes
) -> dict:
    from geoexplora.inference.runner import sidecar_path, work_folder

    n = len(plan)
    return {
        "inputs": [str(p) for p in input_files(inputs)],
        "output": str(output),
        "outputs": {p.key: str(p.path) for p in products},
        "sidecar": str(sidecar_path(output)),
        "work_folder": str(work_folder(output)),
        "task": predictor.task,
        "plan": plan.describe(),
        "batches": math.ceil(n / cfg.batch_size),
        "batch_size": cfg.batch_size,
        "blend": cfg.blend,
        "devices": [str(d) for d in devices],
        "band_mapping": mapping,
        "dates": scene.dates,
        "memory": memory_estimate(
            scene, plan, predictor, products, cfg.batch_size, cfg.prefetch, len(devices), votes
        ),
    }


def check_memory(scene, plan, predictor, products, cfg, devices, votes: bool, output: Path) -> None:
    """Refuse a plan whose estimate (``--dry-run``'s ``memory``) cannot fit in the memory the
    machine has available, before any of it is allocated."""
    from geoexplora.memory import check_fits

    estimate = memory_estimate(
        scene, plan, predictor, products, cfg.batch_size, cfg.prefetch, len(devices), votes
    )
    check_fits(
        estimate["total_bytes"],
        f"{output} (--window {plan.window}, --batch-size {cfg.batch_size})",
        "use a smaller --window or --batch-size (--dry-run shows the estimate)",
    )


def finish_result(result: dict, output: Path) -> dict:
    if result.get("status") == "complete" and result.get("valid_pixels") == 0:
        logger.warning("%s: the input has no valid pixel; the output is all nodata", output)
    return result


def prepare_jobs(cfg):
    """What predict and embed share before their jobs: (jobs, devices, model, model sha256,
    run options)."""
    from geoexplora.devices import resolve_devices
    from geoexplora.inference.runner import parse_shard
    from geoexplora.models.file import load_model
    from geoexplora.provenance import sha256_file

    shard = parse_shard(cfg.shard)
    jobs = plan_jobs(cfg.inputs, cfg.output, shard)
    devices = resolve_devices(cfg.device, cfg.devices)
    if isinstance(cfg.model, (str, os.PathLike)):
        model, model_sha = load_model(cfg.model), sha256_file(cfg.model)
    else:
        model, model_sha = cfg.model, module_sha256(cfg.model)
    # One output: the shard is a range of its strips; an output folder: every n-th input.
    run_opts = _run_options(cfg, None if output_is_folder(cfg.output) else shard)
    return jobs, devices, model, model_sha, run_opts


def model_name(model) -> str:
    """How provenance and messages name the model: its file, or an in-memory model."""
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return getattr(model, "source_spec", None) or "<in-memory model>"


def module_sha256(module) -> str:
    """sha256 of a loaded model's weights and metadata: a resumable run's fingerprint."""
    import hashlib

    digest = hashlib.sha256(
        json.dumps(getattr(module, "meta", {}), sort_keys=True, default=str).encode()
    )
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def owned(scene, inputs: list):
    """The scene as a context that closes it when the job is done, if this run opened it; an
    open :class:`~geoexplora.io.scene.Scene` the caller passed stays open (it is theirs)."""
    import contextlib

    from geoexplora.io.scene import Scene

    return contextlib.nullcontext(scene) if isinstance(inputs[0], Scene) else scene


def input_files(inputs: list) -> list[Path]:
    """The files behind a job's inputs (an open Scene's source files)."""
    from geoexplora.io.remote import as_path
    from geoexplora.io.scene import Scene

    if len(inputs) == 1 and isinstance(inputs[0], Scene):
        return list(dict.fromkeys(s.path for frame in inputs[0].sources for s in frame))
    return [as_path(p) for p in inputs]


@reports_progress
def predict(cfg: PredictConfig) -> list[RasterResult]:
    """Predict every job of ``cfg``; one result per output (its plan, with ``dry_run``)."""

    if cfg.vectorize and output_is_folder(cfg.output):
        raise UserError(f"{opt('vectorize')} writes one file: use it with one output raster")
    jobs, devices, model, model_sha, run_opts = prepare_jobs(cfg)
    results = []
    for inputs, output in jobs:
        scene, read, mapping = open_model_scene(
            inputs, cfg.scene, model.meta, model_name(cfg.model)
        )
        with owned(scene, inputs):
            results.append(
                _predict_job(
                    cfg, inputs, output, scene, read, mapping, model, model_sha, devices, run_opts
                )
            )
    return results


def _predict_job(
    cfg, inputs, output, scene, read, mapping, model, model_sha: str, devices, run_opts
) -> RasterResult:
    """One job: one scene into one output (or its plan, with ``dry_run``)."""
    from geoexplora.inference.model import predictor_from_model
    from geoexplora.inference.products import class_products

    predictor = predictor_from_model(model, read.days)
    plan = make_plan(scene, predictor, cfg.window, cfg.overlap, cfg.dense)
    votes = cfg.uncertainty and plan.mode == "dense" and plan.overlap > 0
    products = class_products(
        output,
        output_grid(scene, plan),
        predictor.classes,
        probabilities=cfg.probabilities,
        prob_dtype=cfg.prob_dtype,
        uncertainty=cfg.uncertainty,
        disagreement=votes,
        tags={"GEOEXPLORA_MODEL_SHA256": model_sha, "GEOEXPLORA_TASK": predictor.task},
    )
    check_outputs(products, cfg, [cfg.vectorize] if cfg.vectorize else [], inputs)
    if cfg.dry_run:
        return RasterResult.from_report(
            dry_run_doc(
                inputs, output, scene, plan, predictor, products, mapping, cfg, devices, votes
            ),
            dry_run=True,
        )
    check_memory(scene, plan, predictor, products, cfg, devices, votes, output)
    settings = {
        "task": predictor.task,
        "blend": cfg.blend,
        "probabilities": cfg.probabilities,
        "prob_dtype": cfg.prob_dtype,
        "uncertainty": cfg.uncertainty,
        "dense": cfg.dense,
    }
    provenance = {
        "command": "predict",
        "model": {"path": model_name(cfg.model), "sha256": model_sha},
        "inputs": [str(p) for p in input_files(inputs)],
        "scene": scene.describe(),
        "band_mapping": mapping,
        "task": predictor.task,
        "classes": predictor.classes,
        "devices": [str(d) for d in devices],
        "versions": package_versions(),
    }
    result = predict_scene(
        scene,
        predictor,
        plan,
        products,
        devices,
        run_opts,
        job_fingerprint(model_sha, inputs, plan, settings),
        provenance,
        votes=votes,
    )
    if cfg.vectorize and result["status"] == "complete":
        from geoexplora.inference.vectorize import vectorize

        result["vectorized"] = vectorize(output, cfg.vectorize, predictor.classes, cfg.overwrite)
    return RasterResult.from_report(
        finish_result(
            {"input": [str(p) for p in input_files(inputs)], "output": str(output), **result},
            output,
        ),
        dry_run=False,
    )
