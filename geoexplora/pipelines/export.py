"""``export``: any model spec as a self-describing geoexplora model file, or as ONNX.

``export(ExportConfig(model=SPEC, output=...))`` builds the model a spec names - a registry or
timm name (with ``init_weights``: a local checkpoint or ``"random"``), ``torchgeo:ENUM``, or a
geoexplora model file - on the requested bands, with statistics from a chips dataset or scenes
(``stats_from``) or else the source's own, and writes it:

- ``format="geoexplora"``: a model file (:mod:`geoexplora.models.file`) like the ones ``adapt``
  and ``finetune`` write, so a source model is a file like any other (``probe source.pt
  adapted.pt chips/``). A task model file keeps its head.
- ``format="onnx"``: the backbone (outputs ``cls (B, D)`` and ``patch (B, T, N, D)``) or the task
  model (``logits``) as ONNX, with a JSON sidecar ``OUT.json`` (bands, statistics, classes, patch
  size, input shape, task). The exported graph takes canonical units (reflectance x 10000, NaN =
  nodata) and normalises inside, as the PyTorch model does. After writing, onnxruntime runs it
  on CPU on a random input and its output is compared with PyTorch's: the max abs diff is in the
  result, and above ``atol + rtol * max|output|`` (:data:`geoexplora.defaults.EXPORT`) the export
  fails with nothing written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from geoexplora.config_checks import one_of
from geoexplora.defaults import DATA, EXPORT
from geoexplora.errors import RuntimeFailure, UserError, opt
from geoexplora.log import logger
from geoexplora.results import ExportResult

ExportFormat = Literal["geoexplora", "onnx"]
ONNX_FORMAT_NAME = "geoexplora-onnx"
ONNX_MAX_BYTES = 2 * 1024**3  # one protobuf file (no external data): 2 GiB
NOTE_ONNX_USE = (
    "run with onnxruntime: InferenceSession(path).run(None, {'image': x}) on "
    "windows of the input size; geoexplora predict reads the model file this was "
    "exported from (it streams, blends and georeferences windows itself)"
)
NOTE_ONNX_INPUTS = (
    "every frame is attended to (the graph has no frame-mask input); NaN pixels "
    "become the band mean, as in PyTorch"
)


@dataclass
class ExportConfig:
    """``geoexplora export MODEL -o OUT``; defaults in ``geoexplora.defaults.EXPORT``."""

    model: str | Path
    output: Path
    bands: list[str] | None = None  # band names (with sensor) or sensor:name keys
    sensor: str | None = None  # the bands' sensor (default sentinel2); alone: all its bands
    init_weights: str | None = None  # for specs that are not model files: a checkpoint, random
    stats_from: list[Path] | None = None  # a chips dataset folder, or scenes
    format: ExportFormat = "geoexplora"
    image_size: int | None = None  # ONNX input size in px (default: the model's image size)
    opset: int = EXPORT.onnx_opset
    atol: float = EXPORT.onnx_atol
    rtol: float = EXPORT.onnx_rtol
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self):
        one_of("format", self.format, ExportFormat)
        self.output = Path(self.output)
        if self.stats_from is not None:
            self.stats_from = [Path(p) for p in self.stats_from]


# ---------------------------------------------------------------------------------------------
# Bands and statistics
# ---------------------------------------------------------------------------------------------


def requested_bands(tokens: list[str] | None, sensor: str | None):
    """The bands named by ``bands`` (names of ``sensor``, default sentinel2, or sensor:name
    keys), or all bands of ``sensor`` alone; None when neither is given."""
    from geoexplora import bands as B

    if not tokens:
        if sensor is None:
            return None
        return list(B.SENSORS[B.canonical_sensor(sensor)])
    default = B.canonical_sensor(sensor) if sensor else "sentinel2"
    out = []
    for token in tokens:
        if ":" in token:
            out.append(B.band_from_key(token))
        else:
            band = B.find_band(default, token)
            if band is None:
                names = ", ".join(b.name for b in B.SENSORS[default])
                raise UserError(
                    f"band '{token}' is not a {default} band (it has: {names}); "
                    f"name the sensor with {opt('sensor')}",
                    option="bands",
                )
            out.append(band)
    B.check_distinct(list(tokens), out)
    return out


def data_bands_and_stats(
    paths: list[Path], tokens: list[str] | None, sensor: str | None, seed: int = 0, scene_opts=None
) -> tuple[list, dict]:
    """(bands, ``{"mean", "std", "origin", "from"}``) of a chips dataset (its ``dataset.json``)
    or of scenes (robust statistics of random windows, as ``adapt`` computes them; read with
    ``scene_opts``, whose bands and sensor ``tokens`` and ``sensor`` replace)."""
    from geoexplora.pipelines.adapt import _chip_band_indices, _is_chips_dataset

    if len(paths) == 1 and _is_chips_dataset(paths[0]):
        from geoexplora.io.chips import ChipsDataset

        chips = ChipsDataset(paths[0])
        indices = _chip_band_indices(chips, tokens)
        return (
            [chips.bands[i] for i in indices],
            {
                "mean": [chips.stats["mean"][i] for i in indices],
                "std": [chips.stats["std"][i] for i in indices],
                "origin": "dataset.json",
                "from": str(paths[0]),
            },
        )
    chips_given = [p for p in paths if _is_chips_dataset(p)]
    if chips_given:
        raise UserError(
            f"give one chips dataset ({chips_given[0]}) or scenes, not both or several",
            option="stats_from",
        )
    import dataclasses

    from geoexplora.io.scene import SceneOptions
    from geoexplora.io.stats import robust_band_stats
    from geoexplora.pipelines.adapt import open_scenes
    from geoexplora.train.sampling import SceneWindows

    opts = dataclasses.replace(
        scene_opts or SceneOptions(),
        bands=tokens,
        sensor=sensor or (scene_opts.sensor if scene_opts else None),
    )
    scenes = open_scenes(paths, opts)  # same bands in every scene, or a UserError
    window = min(DATA.crop_size, *(min(s.width, s.height) for s in scenes))
    windows = SceneWindows(scenes, window, seed)
    stats = robust_band_stats(windows.pixel_stream(DATA.stats_sample_windows, seed), seed=seed)
    return list(scenes[0].bands), {
        "mean": stats["mean"],
        "std": stats["std"],
        "origin": "data sample",
        "from": [str(p) for p in paths],
    }


# ---------------------------------------------------------------------------------------------
# The model a spec names
# ---------------------------------------------------------------------------------------------


def build_spec_model(
    spec: str,
    init_weights: str | None = None,
    bands=None,
    stats: dict | None = None,
    img_size: int | None = None,
    num_frames: int | None = None,
):
    """The module a spec names, ready to save: a model file as it is (a task model keeps its
    head; other ``bands``/``stats``/``num_frames`` re-target its backbone), anything else built by
    :func:`~geoexplora.models.build_backbone` (an RGB source on other bands gets the band-aware
    embedding, exactly as ``adapt`` builds it)."""
    from geoexplora.models import build_backbone
    from geoexplora.models.registry import resolve_init

    resolved = resolve_init(str(spec), init_weights)
    stats_arg = {"mean": stats["mean"], "std": stats["std"]} if stats else None
    if resolved.kind != "model_file":
        return build_backbone(
            init=str(spec),
            init_weights=init_weights,
            bands=bands,
            stats=stats_arg,
            img_size=img_size or DATA.crop_size,
            num_frames=num_frames or 1,
        )
    from geoexplora.models.file import load_model, read_model_meta

    meta = read_model_meta(resolved.model_path)
    frames = num_frames or meta["backbone"]["num_frames"]
    changed = bands is not None or stats is not None or frames != meta["backbone"]["num_frames"]
    model = load_model(resolved.model_path)
    if not changed:
        return model
    backbone = build_backbone(
        init=str(spec),
        bands=bands,
        stats=stats_arg,
        num_frames=frames,
        spectral_tokens=meta["backbone"]["spectral_tokens"],
    )
    if meta.get("task"):
        model.backbone = backbone
        return model
    return backbone


def source_for_rasters(spec, inputs: list[Path], scene_opts=None):
    """A :class:`~geoexplora.train.features.SourceSpec` built on a scene's bands (``spec.bands``
    of them, or all) with the scene's statistics, as an in-memory backbone carrying the
    model-file metadata (``.meta``) that ``predict``/``embed`` read."""
    import torch

    from geoexplora.models.file import FORMAT_VERSION
    from geoexplora.train.features import source_provenance

    bands, stats = data_bands_and_stats(
        inputs, list(spec.bands) if spec.bands else None, None, spec.seed, scene_opts
    )
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = build_spec_model(spec.spec, spec.init_weights, bands, stats)
    _stats_origin(model, stats)
    model.meta = {
        "format_version": FORMAT_VERSION,
        "kind": "backbone",
        "backbone": model.config,
        "task": None,
        "provenance": {"source": source_provenance(spec)},
    }
    model.source_spec = spec.spec
    return model.eval()


def _stats_origin(module, stats: dict | None) -> None:
    """Record where data statistics came from in the backbone's config."""
    if stats is None:
        return
    backbone = getattr(module, "backbone", module)
    backbone.config["stats"] = {
        **backbone.config["stats"],
        "origin": stats["origin"],
        "from": stats["from"],
    }


# ---------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------


def _onnx_module(model):
    """The graph ONNX gets: images (and dates, for temporal models) in, tensors out."""
    import torch

    from geoexplora.models.heads import TaskModel

    task = isinstance(model, TaskModel)

    class Exported(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, image, dates=None):
            if task:
                return self.model(image, dates=dates)
            out = self.model.forward_features(image, dates=dates)
            return out["cls"], out["patch"]

    return Exported().eval()


def _random_input(backbone, size: int, batch: int, seed: int):
    """Images of plausible canonical values: each band's mean + std x N(0, 1); dates for
    temporal models (a year apart from 2020-01-01)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    t, c = backbone.num_frames, len(backbone.bands)
    noise = torch.randn(batch, t, c, size, size, generator=g)
    image = backbone.band_mean.view(1, 1, c, 1, 1) + backbone.band_std.view(1, 1, c, 1, 1) * noise
    inputs = [image.float()]
    if t > 1:
        inputs.append((18262.0 + 30.0 * torch.arange(t, dtype=torch.float32)).repeat(batch, 1))
    return inputs


def _onnx_spec(model, size: int) -> dict:
    """Input and output names and shapes of the exported graph (the sidecar's ``input``)."""
    from geoexplora.models.heads import TaskModel

    task = isinstance(model, TaskModel)
    backbone = model.backbone if task else model
    t, c = backbone.num_frames, len(backbone.bands)
    h, w = backbone.grid_size(size, size)
    inputs = [
        {
            "name": "image",
            "shape": ["batch", t, c, size, size],
            "dtype": "float32",
            "units": "canonical (reflectance x 10000; NaN = nodata), not normalised: the "
            "model z-scores with its statistics",
        }
    ]
    if t > 1:
        inputs.append(
            {
                "name": "dates",
                "shape": ["batch", t],
                "dtype": "float32",
                "units": "days since 1970-01-01",
            }
        )
    if not task:
        outputs = [
            {"name": "cls", "shape": ["batch", backbone.embed_dim]},
            {"name": "patch", "shape": ["batch", t, h * w, backbone.embed_dim], "grid": [h, w]},
        ]
    elif model.task == "segmentation":
        outputs = [{"name": "logits", "shape": ["batch", len(model.classes), size, size]}]
    else:
        outputs = [
            {
                "name": "logits",
                "shape": ["batch", len(model.classes)],
                "activation": "sigmoid" if model.task == "multilabel" else "softmax",
            }
        ]
    return {"inputs": inputs, "outputs": outputs}


def _export_onnx(model, path: Path, io: dict, example: list, opset: int) -> str:
    """torch.onnx.export: the dynamo-based exporter first (``dynamo=True``, torch's default),
    the TorchScript-based one (``dynamo=False``) when it fails. Returns which one wrote the
    file; UserError, naming the reason, when neither can express the model."""
    import contextlib
    import io as _io
    import re
    import warnings

    import torch

    names_in = [i["name"] for i in io["inputs"]]
    names_out = [o["name"] for o in io["outputs"]]
    batch = torch.export.Dim("batch", min=1)
    attempts = (
        (
            "dynamo",
            {
                "dynamo": True,
                "dynamic_shapes": tuple({0: batch} for _ in names_in),
                "optimize": True,
                "external_data": False,
            },
        ),
        (
            "torchscript",
            {
                "dynamo": False,
                "do_constant_folding": True,
                "dynamic_axes": {n: {0: "batch"} for n in names_in + names_out},
            },
        ),
    )
    reasons = []
    for name, kwargs in attempts:
        chatter = _io.StringIO()  # the exporters print progress on stdout: keep it for -v
        try:
            with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(chatter):
                warnings.simplefilter("ignore")  # tracer warnings on shape arithmetic
                torch.onnx.export(
                    model,
                    tuple(example),
                    str(path),
                    input_names=names_in,
                    output_names=names_out,
                    opset_version=opset,
                    **kwargs,
                )
        except Exception as exc:  # noqa: BLE001 - each exporter fails in its own ways
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # no terminal colours
            reasons.append(f"{name}: {text.splitlines()[0] if text else type(exc).__name__}")
            logger.debug("ONNX %s exporter failed: %s", name, text)
            path.unlink(missing_ok=True)
            continue
        logger.debug("%s", chatter.getvalue().strip())
        if name == "dynamo":
            return f"torch.onnx.export(dynamo=True), opset {opset}"
        logger.warning("the dynamo ONNX exporter failed (%s); used dynamo=False", reasons[0])
        return f"torch.onnx.export(dynamo=False, TorchScript-based), opset {opset}"
    raise UserError(
        f"ONNX cannot express this model (opset {opset}): {'; '.join(reasons)}", option="format"
    )


def _check_onnx(model, path: Path, io: dict, example: list, atol: float, rtol: float) -> dict:
    """Run the ONNX file with onnxruntime (CPU) and compare with PyTorch on the same input."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i["name"]: x.numpy() for i, x in zip(io["inputs"], example)}
    got = session.run(None, feeds)
    with torch.no_grad():
        ref = model(*example)
    ref = ref if isinstance(ref, tuple) else (ref,)
    diff = max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, ref))
    scale = max(float(r.abs().max()) for r in ref)
    limit = atol + rtol * scale
    return {
        "max_abs_diff": diff,
        "max_abs_output": scale,
        "tolerance": limit,
        "atol": atol,
        "rtol": rtol,
        "batch": int(example[0].shape[0]),
        "runtime": f"onnxruntime {ort.__version__} (CPUExecutionProvider)",
        "input": "random (band mean + std x N(0, 1))",
        "passed": diff <= limit,
    }


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise UserError(
            f"ONNX export needs the onnx extra ({exc.name} is not installed): "
            "pip install 'geoexplora[onnx]'",
            option="format",
        ) from exc


def write_onnx(model, output: Path, cfg: ExportConfig, source: dict) -> dict:
    """``output`` (ONNX) and ``output.json`` (sidecar), atomically, after the runtime check."""
    import hashlib

    from geoexplora.inference.runner import sidecar_path
    from geoexplora.io.outputs import atomic_output
    from geoexplora.models.heads import TaskModel

    task = isinstance(model, TaskModel)
    backbone = model.backbone if task else model
    size = cfg.image_size or int(backbone.config["architecture"]["img_size"][0])
    if size % backbone.patch_size:
        raise UserError(
            f"{size} px is not a multiple of the model's {backbone.patch_size} px patches",
            option="image_size",
        )
    nbytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    if nbytes >= ONNX_MAX_BYTES:
        raise UserError(
            f"{source['model']}: {nbytes / 1024**3:.1f} GiB of weights; one ONNX "
            "file holds at most 2 GiB (use the geoexplora format)",
            option="format",
        )
    model = model.float().eval()
    wrapped = _onnx_module(model)
    io = _onnx_spec(model, size)
    example = _random_input(backbone, size, EXPORT.check_batch, cfg.seed)
    sidecar = sidecar_path(output)
    with (
        atomic_output(output, cfg.overwrite) as tmp,
        atomic_output(sidecar, cfg.overwrite) as tmp_json,
    ):
        exporter = _export_onnx(wrapped, tmp, io, example, cfg.opset)
        check = _check_onnx(wrapped, tmp, io, example, cfg.atol, cfg.rtol)
        if not check["passed"]:
            raise RuntimeFailure(
                f"{output}: onnxruntime's output differs from PyTorch's by "
                f"{check['max_abs_diff']:.3g} (tolerance {check['tolerance']:.3g}); nothing "
                "written"
            )
        doc = {
            "format": ONNX_FORMAT_NAME,
            "format_version": 1,
            "onnx": output.name,
            "sha256": hashlib.sha256(tmp.read_bytes()).hexdigest(),
            "kind": "task" if task else "backbone",
            "task": model.task if task else None,
            "classes": model.classes if task else None,
            "bands": [{**b.to_dict(), "key": b.key} for b in backbone.bands],
            "stats": {
                "mean": backbone.band_mean.tolist(),
                "std": backbone.band_std.tolist(),
                "origin": backbone.config["stats"].get("origin"),
                "applied": "inside the model",
            },
            "patch_size": backbone.patch_size,
            "image_size": size,
            "num_frames": backbone.num_frames,
            "embed_dim": backbone.embed_dim,
            **io,
            "exporter": exporter,
            "check": check,
            "architecture": backbone.config["architecture"],
            "source": source,
            "notes": [NOTE_ONNX_INPUTS, NOTE_ONNX_USE],
        }
        tmp_json.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _source_description(cfg: ExportConfig) -> dict:
    from geoexplora.provenance import sha256_file

    out = {"model": str(cfg.model), "init_weights": cfg.init_weights}
    path = Path(str(cfg.model)).expanduser()
    if path.is_file():
        out["sha256"] = sha256_file(path)
    if cfg.init_weights and cfg.init_weights.strip().lower() != "random":
        out["init_weights_sha256"] = sha256_file(Path(cfg.init_weights).expanduser())
    return out


def export(cfg: ExportConfig) -> ExportResult:
    """Write ``cfg.model`` as ``cfg.format`` to ``cfg.output``; UserError on bad input before
    anything is written."""
    import torch

    from geoexplora.io.outputs import check_not_input, check_output
    from geoexplora.models.heads import TaskModel

    output = Path(cfg.output)
    check_output(output, cfg.overwrite)
    inputs = [Path(str(cfg.model)), *(cfg.stats_from or [])]
    if cfg.init_weights and cfg.init_weights.strip().lower() != "random":
        inputs.append(Path(cfg.init_weights))
    check_not_input([output], inputs)
    if cfg.format == "onnx":
        from geoexplora.inference.runner import sidecar_path

        check_output(sidecar_path(output), cfg.overwrite)
        check_not_input([sidecar_path(output)], inputs)
        _require_onnx()
    if cfg.image_size is not None and cfg.image_size < 1:
        raise UserError(f"must be at least 1, not {cfg.image_size}", option="image_size")

    bands = requested_bands(cfg.bands, cfg.sensor)
    stats = None
    if cfg.stats_from:
        bands, stats = data_bands_and_stats(cfg.stats_from, cfg.bands, cfg.sensor, cfg.seed)
    torch.manual_seed(cfg.seed)  # random initialisations are reproducible
    model = build_spec_model(str(cfg.model), cfg.init_weights, bands, stats, cfg.image_size)
    _stats_origin(model, stats)
    source = _source_description(cfg)
    task = isinstance(model, TaskModel)
    backbone = model.backbone if task else model
    doc = {
        "output": str(output),
        "format": cfg.format,
        "kind": "task" if task else "backbone",
        "model": str(cfg.model),
        "task": model.task if task else None,
        "bands": [b.key for b in backbone.bands],
        "stats": {
            "mean": backbone.band_mean.tolist(),
            "std": backbone.band_std.tolist(),
            "origin": backbone.config["stats"].get("origin"),
        },
        "num_frames": backbone.num_frames,
        "patch_size": backbone.patch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "source": source,
    }
    if cfg.format == "geoexplora":
        from geoexplora.models.file import save_model

        meta = {"provenance": {"export": {**source, "stats_from": stats and stats["from"]}}}
        save_model(output, model, meta, overwrite=cfg.overwrite)
        doc["sidecar"] = None
        return ExportResult.from_report(doc)
    onnx_doc = write_onnx(model, output, cfg, source)
    from geoexplora.inference.runner import sidecar_path

    doc.update(
        sidecar=str(sidecar_path(output)),
        exporter=onnx_doc["exporter"],
        check=onnx_doc["check"],
        inputs=onnx_doc["inputs"],
        outputs=onnx_doc["outputs"],
        image_size=onnx_doc["image_size"],
    )
    return ExportResult.from_report(doc)
