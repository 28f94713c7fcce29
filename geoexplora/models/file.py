"""The model file (``model.pt``): tensors and metadata, loadable with ``weights_only=True``.

Layout: ``{"format": "geoexplora-model", "format_version": 1, "meta_json": str,
"state_dict": {name: tensor}}``. The metadata travels as JSON text so that nothing but tensors,
strings and ints is ever unpickled. It holds the backbone's config (architecture, patch and image
size, bands with wavelengths, normalisation statistics, temporal layout, spectral-token mode,
ExPLoRA settings and parameter report, source weights and their sha256), the task (head, classes,
colours) when there is one, and provenance (package versions, creation time, and whatever the
writing command adds: data, training settings, the CLI's resolved options). Models are always
stored merged (no LoRA), so loading needs neither peft nor the adapter code.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from geoexplora.bands import Band, band_from_key
from geoexplora.errors import UserError, opt
from geoexplora.io.outputs import atomic_output, check_output, torch_save
from geoexplora.models.checkpoints import (
    is_weights_only_refusal,
    refuse_python_objects,
    unpickling_reason,
)
from geoexplora.models.geovit import GeoViT, geovit_from_config
from geoexplora.models.heads import TaskModel, build_head
from geoexplora.models.temporal import days_since_epoch
from geoexplora.provenance import package_versions, sha256_file
from geoexplora.runconfig import current as current_run_config

FORMAT_NAME = "geoexplora-model"
FORMAT_VERSION = 1


def save_model(
    path: str | Path, module: nn.Module, meta: dict | None = None, overwrite: bool = False
) -> Path:
    """Write ``module`` (a GeoViT or TaskModel) atomically; LoRA is merged into a copy first.

    ``meta``: extra JSON-able metadata (e.g. ``{"provenance": {"data": ...}, "training":
    {...}}``); ``provenance`` is merged with the package versions and creation time.
    """
    if not isinstance(module, (GeoViT, TaskModel)):
        raise TypeError(f"save_model takes a GeoViT or TaskModel, not {type(module).__name__}")
    check_output(path, overwrite)
    from geoexplora.models.explora import has_lora, merge_lora

    if has_lora(module) or _has_split_qkv(module):
        module = merge_lora(copy.deepcopy(module))
    backbone = module.backbone if isinstance(module, TaskModel) else module
    extra = dict(meta or {})
    provenance = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": package_versions(),
        **extra.pop("provenance", {}),
    }
    if (run_config := current_run_config()) is not None:
        provenance["config"] = run_config
    state = {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}
    full_meta = {
        **extra,
        "format_version": FORMAT_VERSION,
        "kind": "task" if isinstance(module, TaskModel) else "backbone",
        "backbone": backbone.config,
        "task": module.config if isinstance(module, TaskModel) else None,
        "provenance": provenance,
    }
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "meta_json": json.dumps(full_meta),
        "state_dict": state,
    }
    with atomic_output(path, overwrite=overwrite) as tmp:
        torch_save(payload, tmp)
    return Path(path)


def _has_split_qkv(module: nn.Module) -> bool:
    from geoexplora.models.explora import SplitQKV

    return any(isinstance(m, SplitQKV) for m in module.modules())


def _read(path: str | Path, mmap: bool) -> tuple[dict, dict]:
    """(meta, state_dict) of a model file, or a UserError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives; anything else is not ours
        raise UserError(
            f"{path}: not a readable model file (not a torch.save archive: corrupt, "
            "truncated or another format)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if is_weights_only_refusal(exc):
            refuse_python_objects(path, exc, "not a geoexplora model file: it ")
        raise UserError(
            f"{path}: not a readable model file (corrupt or not written by "
            f"torch.save: {unpickling_reason(exc)})"
        ) from exc
    except (
        RuntimeError,
        EOFError,
        ValueError,
        OSError,
        KeyError,
        IndexError,
        AttributeError,
        zipfile.BadZipFile,
    ) as exc:
        raise UserError(
            f"{path}: not a readable model file (corrupt, truncated or not written "
            f"by torch.save: {exc})"
        ) from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
        raise UserError(
            f"{path}: not a geoexplora model file (a raw checkpoint? give it as "
            f"{opt('init_weights')} with {opt('init')} naming its architecture)"
        )
    version = obj.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise UserError(f"{path}: corrupt model file (format version {version!r})")
    if version > FORMAT_VERSION:
        raise UserError(
            f"{path}: model file format {version} is newer than this geoexplora "
            f"reads (up to {FORMAT_VERSION}); upgrade geoexplora"
        )
    try:
        meta = json.loads(obj["meta_json"])
        state = obj["state_dict"]
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: corrupt model file (metadata unreadable: {exc})") from exc
    _check_meta(path, meta)
    return meta, state


def _check_meta(path: Path, meta) -> None:
    """The metadata every reader relies on: its own format version (the archive's says how the
    file is packed, this one what the metadata means; both are checked, so a newer file is never
    read, or re-saved, as an older one) and the backbone's architecture and bands."""
    if not isinstance(meta, dict):
        raise UserError(f"{path}: corrupt model file (metadata is not a JSON object)")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise UserError(f"{path}: corrupt model file (metadata format version {version!r})")
    if version > FORMAT_VERSION:
        raise UserError(
            f"{path}: model metadata format {version} is newer than this geoexplora "
            f"reads (up to {FORMAT_VERSION}); upgrade geoexplora"
        )
    backbone = meta.get("backbone")
    if not isinstance(backbone, dict) or not isinstance(backbone.get("architecture"), dict):
        raise UserError(f"{path}: corrupt model file (metadata lacks the backbone's architecture)")
    bands = backbone.get("bands")
    if (
        not isinstance(bands, list)
        or not bands
        or not all(isinstance(b, dict) and isinstance(b.get("key"), str) for b in bands)
    ):
        raise UserError(f"{path}: corrupt model file (metadata lacks the backbone's bands)")


def read_model_meta(path: str | Path) -> dict:
    """The metadata of a model file, without loading its weights into memory."""
    return _read(path, mmap=True)[0]


def load_model(path: str | Path) -> GeoViT | TaskModel:
    """A GeoViT or TaskModel in eval mode, with ``.meta`` (the file's metadata)."""
    meta, state = _read(path, mmap=False)
    try:
        # Built on the meta device (no random init of weights about to be replaced), then the
        # file's tensors are assigned and the band-derived buffers recomputed.
        with torch.device("meta"):
            backbone = geovit_from_config(meta["backbone"])
            model: GeoViT | TaskModel = backbone
            if meta.get("task"):
                task = meta["task"]
                head = build_head(task["task"], backbone.embed_dim, **task["head"])
                model = TaskModel(backbone, head, task["task"], task["classes"])
    except (KeyError, TypeError) as exc:
        raise UserError(f"{path}: corrupt model file (metadata incomplete: {exc})") from exc
    missing, unexpected = (
        sorted(set(model.state_dict()) - set(state)),
        sorted(set(state) - set(model.state_dict())),
    )
    if missing or unexpected:
        raise UserError(
            f"{path}: corrupt model file (weights do not match its metadata: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise UserError(f"{path}: corrupt model file ({str(exc).splitlines()[0]})") from exc
    backbone.vit.patch_embed.proj.rebuild_buffers()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"load_model left tensors unmaterialised: {left[:5]}")
    model.meta = meta
    return model.eval()


def model_card(path: str | Path) -> dict:
    """Everything in the metadata plus file facts and parameter counts (JSON-able)."""
    path = Path(path)
    meta, state = _read(path, mmap=True)
    counts: dict[str, int] = {}
    for name, tensor in state.items():
        part = "head" if name.startswith("head.") else "backbone"
        if name.endswith(("band_mean", "band_std")):
            continue
        counts[part] = counts.get(part, 0) + tensor.numel()
    return {
        **meta,
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "parameter_counts": {**counts, "total": sum(counts.values())},
    }


@dataclass(frozen=True)
class ReadPlan:
    """How to read a scene for a model: ``scene.read(...)[:, band_indices]`` gives the model's
    bands in the model's order; ``days`` are the frames' dates for the date encoding."""

    band_indices: list[int]
    bands: list[Band]
    num_frames: int
    dates: list[str | None] = field(default_factory=list)
    days: list[float] = field(default_factory=list)


def check_scene_against_model(meta: dict, scene, model_name: str = "the model") -> ReadPlan:
    """Check a scene (``.bands``, ``.dates``) against a model's metadata; the read plan or a
    UserError naming what is missing and what the scene has."""
    backbone = meta["backbone"]
    want = [band_from_key(b["key"]) for b in backbone["bands"]]
    have = {b.key: i for i, b in enumerate(scene.bands)}
    missing = [b for b in want if b.key not in have]
    if missing:
        raise UserError(
            f"{model_name} needs bands {', '.join(b.key for b in want)}; the scene "
            f"lacks {', '.join(b.key for b in missing)} (it has "
            f"{', '.join(b.key for b in scene.bands) or 'none'})"
        )
    frames = backbone["num_frames"]
    dates = list(scene.dates)
    if frames == 1 and len(dates) > 1:
        raise UserError(
            f"{model_name} takes a single date; the scene has {len(dates)} "
            f"({', '.join(str(d) for d in dates)}): give one date"
        )
    if frames != len(dates):
        raise UserError(f"{model_name} takes {frames} dates; the scene has {len(dates)}")
    if frames > 1 and any(d is None for d in dates):
        unknown = [i + 1 for i, d in enumerate(dates) if d is None]
        raise UserError(
            f"{model_name} encodes acquisition dates; the scene's frame(s) "
            f"{unknown} have none: pass {opt('dates')}"
        )
    return ReadPlan(
        [have[b.key] for b in want],
        want,
        frames,
        dates,
        days_since_epoch(dates) if frames > 1 else [],
    )
