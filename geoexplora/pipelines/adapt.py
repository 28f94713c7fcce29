"""``adapt``: ExPLoRA extended self-supervised pre-training, as a library function.

``adapt(AdaptConfig(inputs=[...], output=...))`` reads scenes (random windows weighted by valid
area) or a chips dataset, builds the initial model with the data's band statistics, applies
ExPLoRA (LoRA on Q, V of the frozen blocks, the last block unfrozen, norms, tokens and - for new
bands - the patch embedding trained), trains it with the source model's own objective (DINOv2
or MAE) on the shared Fabric engine, and writes the merged model file. See
``docs/recipe.md`` for what each default reproduces; the values live in
:mod:`geoexplora.defaults`.

With ``devices > 1`` the default DDP strategy re-runs the calling program once per extra device
(Lightning's subprocess launcher): from Python, use a script whose ``sys.argv`` re-runs the same
call, as the CLI does. Only rank 0 writes files; ``adapt`` returns the summary on rank 0 and
None elsewhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from geoexplora import bands as B
from geoexplora.config_checks import one_of, path_list
from geoexplora.defaults import (
    ADAPT_PRESETS,
    DATA,
    DINOV2,
    ENGINE,
    EXPLORA,
    MAE,
    SCALE,
    dino_head_size,
)
from geoexplora.devices import device_count, resolve_accelerator
from geoexplora.errors import UserError, opt
from geoexplora.log import Progress, logger, reports_progress
from geoexplora.results import AdaptResult
from geoexplora.train import recipe as R
from geoexplora.validate import given_or, require_at_least, require_positive

OBJECTIVES = ("dinov2", "mae")


Objective = Literal["dinov2", "mae"]
Preset = Literal["paper", "quick"]  # geoexplora.defaults.ADAPT_PRESETS
SpectralTokens = Literal["bank", "groups"]  # geoexplora.models.geovit.SPECTRAL_TOKEN_MODES


@dataclass
class AdaptConfig:
    inputs: list[Path]
    output: Path
    bands: list[str] | None = None
    sensor: str | None = None
    band_map: dict[str, str] | None = None
    nodata: float | None = None
    s2_offset: str = "auto"
    init: str | None = None  # None: the registry's default DINOv2 source
    init_weights: str | None = None
    # timm keyword overrides of the initial architecture (random or --init-weights sources),
    # e.g. {"init_values": 1.0}: LayerScale's 1e-5 suits fine-tuning a pre-trained model but
    # makes a randomly initialised one nearly the identity (see benchmarks/domain_shift.py).
    arch_overrides: dict | None = None
    objective: Objective | None = None  # None: the source's family (dinov2 / mae)
    full: bool = False  # full-parameter extended pre-training (the comparison), not ExPLoRA
    steps: int | None = None
    epochs: float | None = None
    # None: the preset's value, else DATA.batch_size / 1 (or what global_batch implies)
    preset: Preset | None = None  # "paper" or "quick" (defaults.ADAPT_PRESETS)
    batch_size: int | None = None
    accumulate: int | None = None
    global_batch: int | None = None  # images per step: accumulate = global / (world x batch)
    accelerator: str = "auto"
    devices: int | list[int] = 1  # how many, or which GPUs ([1]: the second)
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None
    unfreeze_blocks: list[int] = field(default_factory=lambda: list(EXPLORA.unfreeze_blocks))
    lora_rank: int = EXPLORA.lora_rank
    lora_alpha: float = EXPLORA.lora_alpha
    frames: int | None = None  # None: 1 for scenes, the dataset's for chips
    spectral_tokens: SpectralTokens = "bank"  # or "groups": SatMAE's band-group tokens
    split: str | None = "train"  # chips: which split to adapt on (None: all chips)
    crop_size: int = DATA.crop_size
    context_factor: float = DATA.context_factor  # dinov2 on scenes: crops from a larger window
    local_crop_size: int | None = None  # None: DINOV2.local_crop_patches x patch
    local_crops: int | None = None  # None: the preset's, else DINOV2.local_crops
    head_prototypes: int | None = None  # None: dino_head_size(embed_dim)
    head_hidden: int | None = None
    head_bottleneck: int | None = None
    lr: float | None = None  # None: the recipe's base lr scaled to the global batch
    warmup_steps: int | None = None
    drop_path: float | None = None
    checkpoint_every: int = ENGINE.checkpoint_every
    num_workers: int | None = None
    seed: int = 0
    dry_run: bool = False
    stop_if_stalled: bool = False
    resume: bool = False
    overwrite: bool = False
    settings_overrides: dict = field(default_factory=dict)  # DinoV2/Mae defaults fields
    progress: Progress = True  # False, or a callback (see geoexplora.log)

    def __post_init__(self):
        self.inputs = path_list("inputs", self.inputs)
        one_of("objective", self.objective, Objective, optional=True)
        one_of("spectral_tokens", self.spectral_tokens, SpectralTokens)
        one_of("preset", self.preset, Preset, optional=True)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _is_chips_dataset(path) -> bool:
    from geoexplora.io.chips import META_NAME

    return isinstance(path, Path) and path.is_dir() and (path / META_NAME).is_file()


def _input_name(value) -> str:
    """An input as its fingerprint records it: a local path resolved, a URI as given, a parsed
    STAC item by its collection and id."""
    from geoexplora.io.remote import as_path

    if isinstance(value, dict):
        return f"stac:{value.get('collection') or ''}/{value.get('id')}"
    return str(as_path(value).resolve())


def _chip_band_indices(chips, wanted: list[str] | None) -> list[int]:
    if not wanted:
        return list(range(len(chips.bands)))
    out = []
    for token in wanted:
        match = [i for i, b in enumerate(chips.bands) if B.find_band(b.sensor, token) == b]
        if not match:
            have = ", ".join(b.name for b in chips.bands)
            raise UserError(
                f"{opt('bands')} {token}: not in the chips dataset {chips.root} (has: {have})"
            )
        out.append(match[0])
    B.check_distinct(wanted, [chips.bands[i] for i in out])
    return out


def open_scenes(inputs: list[Path], opts) -> list:
    """The inputs' places (:mod:`geoexplora.io.inputs`), each opened as a scene."""
    from geoexplora.io.inputs import check_same_bands, resolve_places
    from geoexplora.io.scene import open_scene

    scenes = [open_scene(list(group), opts) for group in resolve_places(inputs).groups]
    check_same_bands(scenes)
    return scenes


@dataclass
class AdaptData:
    dataset: object  # SceneWindows or ChipSamples
    bands: list
    frames: int
    stats: dict
    description: dict
    epoch_size: int  # samples per "epoch" (chips; valid area / window area for scenes)

    def close(self) -> None:
        """Close the scenes the samples are read from (chips open and close per sample)."""
        close = getattr(self.dataset, "close", None)
        if close is not None:
            close()


def context_window(scenes: list, crop: int, factor: float, frames: int) -> int:
    """The window views are cut from: ``factor x crop`` px where every scene is that big,
    else the largest that fits (never below ``crop``: too small a scene is refused later)."""
    from geoexplora.train.sampling import single_date_scenes

    if factor <= 1:
        return crop
    parts = [s for scene in scenes for s in (single_date_scenes(scene) if frames == 1 else [scene])]
    fits = min(min(s.width, s.height) for s in parts)
    return max(crop, min(round(factor * crop), fits))


def load_data(cfg: AdaptConfig, window: int, prepare=None, context: float = 1.0) -> AdaptData:
    """The training samples and the band statistics (dataset.json, or computed on a sample).
    Scenes: windows of ``context x window`` px where they allow (:func:`context_window`); an
    "epoch" stays the valid area over ``window`` squared."""
    from geoexplora.io.remote import as_path
    from geoexplora.train.sampling import ChipSamples, SceneWindows

    # URIs stay URIs (RemotePath); a STAC item found by a search stays the parsed item.
    inputs = [p if isinstance(p, dict) else as_path(p) for p in cfg.inputs]
    if not inputs:
        raise UserError("no input scenes or chips dataset given")
    chips_inputs = [p for p in inputs if _is_chips_dataset(p)]
    if chips_inputs:
        if len(inputs) > 1:
            raise UserError(
                f"give one chips dataset ({chips_inputs[0]}) or scenes, not both or several"
            )
        from geoexplora.io.chips import ChipsDataset

        split = cfg.split
        chips = ChipsDataset(inputs[0])
        if split is not None and not (chips.index["split"] == split).any():
            split = None  # a dataset without that split: all its chips
        chips = ChipsDataset(inputs[0], split=split)
        indices = _chip_band_indices(chips, cfg.bands)
        frames = given_or(cfg.frames, chips.num_frames)
        if frames != chips.num_frames:
            raise UserError(
                f"{opt('frames')} {frames}: the chips dataset {inputs[0]} has "
                f"{chips.num_frames} date(s) per chip"
            )
        stats = {k: [chips.stats[k][i] for i in indices] for k in ("mean", "std")}
        data = ChipSamples(chips, indices, cfg.seed, prepare)
        return AdaptData(
            data,
            [chips.bands[i] for i in indices],
            frames,
            {**stats, "origin": "dataset.json"},
            {
                "kind": "chips",
                "root": str(inputs[0]),
                "split": split,
                "chips": len(chips),
                "chip_size": chips.chip_size,
            },
            len(chips),
        )

    from geoexplora.io.scene import SceneOptions
    from geoexplora.io.stats import robust_band_stats

    opts = SceneOptions(
        bands=cfg.bands,
        sensor=cfg.sensor,
        band_map=cfg.band_map,
        nodata=cfg.nodata,
        s2_offset=cfg.s2_offset,
    )
    scenes = open_scenes(inputs, opts)
    frames = given_or(cfg.frames, 1)
    if frames > 1:
        undated = [p.name for s in scenes if None in s.dates for p in s.paths]
        if undated:
            raise UserError(
                f"{opt('frames')} {frames} encodes dates; {', '.join(undated)} have none "
                "(name them with a date or pass scenes with date tags)"
            )
    logger.info("measuring the valid area of %d scene(s)", len(scenes))
    crop = window
    window = context_window(scenes, crop, context, frames)
    data = SceneWindows(scenes, window, cfg.seed, prepare, frames)
    stats = robust_band_stats(data.pixel_stream(DATA.stats_sample_windows, cfg.seed), seed=cfg.seed)
    return AdaptData(
        data,
        list(scenes[0].bands),
        frames,
        {"mean": stats["mean"], "std": stats["std"], "origin": "data sample"},
        {
            "kind": "scenes",
            "files": sorted({str(p) for s in scenes for p in s.paths}),
            "scenes": len(data.scenes),
            "valid_pixels": data.valid_pixels,
            "window": window,
            "crop": crop,
        },
        max(1, data.valid_pixels // (crop * crop)),
    )


# ---------------------------------------------------------------------------------------------
# Model and objective
# ---------------------------------------------------------------------------------------------


def choose_objective(cfg: AdaptConfig) -> str:
    """``--objective``, else the source's family (MAE sources -> mae, everything else dinov2)."""
    if cfg.objective is not None:
        if cfg.objective not in OBJECTIVES:
            raise UserError(
                f"{opt('objective')} must be one of {', '.join(OBJECTIVES)}, not '{cfg.objective}'"
            )
        return cfg.objective
    from geoexplora.models.registry import get_architecture, resolve_init, source_family

    spec = resolve_init(cfg.init, cfg.init_weights)
    if spec.kind == "model_file":
        from geoexplora.models.file import read_model_meta

        family = read_model_meta(spec.model_path)["backbone"].get("family", "dinov2")
    elif spec.kind == "timm":
        family = source_family(spec, get_architecture(spec.arch_name))
        if isinstance(spec.weights, Path):
            from geoexplora.models.checkpoints import checkpoint_layout, read_checkpoint

            if checkpoint_layout(read_checkpoint(spec.weights)) == "mae_with_decoder":
                family = "mae"
    else:
        family = "unknown"
    return "mae" if family == "mae" else "dinov2"


def objective_settings(objective: str, overrides: dict):
    base = DINOV2 if objective == "dinov2" else MAE
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(base)})
    if unknown:
        raise UserError(f"unknown {objective} setting(s): {', '.join(unknown)}")
    return dataclasses.replace(base, **overrides)


def run_settings(cfg: AdaptConfig, objective: str):
    """The objective's settings for this run: the recipe's, then the config's own options
    (``local_crops``), then ``settings_overrides``."""
    overrides = dict(cfg.settings_overrides)
    if objective == "dinov2":
        overrides.setdefault("local_crops", cfg.local_crops)
    return objective_settings(objective, overrides)


def build_model(cfg: AdaptConfig, objective: str, settings, bands, stats, frames):
    """The initial backbone with the data's bands/statistics, ExPLoRA applied (unless
    ``full``); returns (backbone, parameter report)."""
    from geoexplora.models import apply_explora, build_backbone, parameter_report

    drop_path = cfg.drop_path if cfg.drop_path is not None else settings.drop_path
    backbone = build_backbone(
        init=cfg.init,
        init_weights=cfg.init_weights,
        bands=bands,
        stats={"mean": stats["mean"], "std": stats["std"]},
        img_size=cfg.crop_size,
        num_frames=frames,
        spectral_tokens=cfg.spectral_tokens,
        drop_path_rate=drop_path,
        arch_overrides=cfg.arch_overrides,
    )
    if getattr(settings, "drop_path_uniform", False):
        uniform_drop_path(backbone, drop_path)
    if cfg.crop_size % backbone.patch_size:
        raise UserError(
            f"{opt('crop_size')} {cfg.crop_size} is not a multiple of the patch size "
            f"{backbone.patch_size}"
        )
    if cfg.full:
        backbone.requires_grad_(True)
        if objective == "mae":
            backbone.mask_token.requires_grad_(False)  # iBOT's; MAE drops tokens instead
        report = parameter_report(backbone)
        backbone.config["full_pretraining"] = {"parameters": report}
    else:
        report = apply_explora(
            backbone,
            unfreeze_blocks=cfg.unfreeze_blocks,
            lora_rank=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=EXPLORA.lora_dropout,
            lora_targets=EXPLORA.lora_targets,
        )
    return backbone, report


def uniform_drop_path(model, rate: float) -> int:
    """Give every residual branch of every transformer block the drop-path rate ``rate``
    (DINOv2's ``drop_path_uniform``; timm ramps it linearly from 0 over the depth). Returns
    the number of branches set."""
    from timm.layers import DropPath
    from torch import nn

    count = 0
    for block in model.modules():
        for attr in ("drop_path1", "drop_path2"):
            if isinstance(getattr(block, attr, None), (DropPath, nn.Identity)):
                setattr(block, attr, DropPath(rate) if rate > 0 else nn.Identity())
                count += 1
    return count


def local_crop_size(cfg: AdaptConfig, patch: int) -> int:
    size = cfg.local_crop_size or DINOV2.local_crop_patches * patch
    if size % patch:
        raise UserError(
            f"{opt('local_crop_size')} {size} is not a multiple of the patch size {patch}"
        )
    return size


def rgb_indices(bands) -> tuple[int, int, int] | None:
    """The positions of red, green and blue when the bands are exactly those three (RGB colour
    augmentation), else None (the multispectral analogues)."""
    names = [getattr(b, "common_name", None) for b in bands]
    if len(names) == 3 and set(names) == {"red", "green", "blue"}:
        return names.index("red"), names.index("green"), names.index("blue")
    return None


def make_objective(
    cfg: AdaptConfig, objective: str, settings, backbone, total_steps: int, bands=()
):
    if objective == "dinov2":
        from geoexplora.defaults import DinoHeadSize
        from geoexplora.ssl.dinov2 import CropSizes, DinoV2Objective

        size = dino_head_size(backbone.embed_dim)
        size = DinoHeadSize(
            cfg.head_hidden or size.hidden,
            cfg.head_bottleneck or size.bottleneck,
            cfg.head_prototypes or size.prototypes,
        )
        crops = CropSizes(cfg.crop_size, local_crop_size(cfg, backbone.patch_size))
        return DinoV2Objective(backbone, size, crops, total_steps, settings, rgb=rgb_indices(bands))
    from geoexplora.ssl.mae import MaeObjective

    return MaeObjective(backbone, cfg.crop_size, settings, lora_alpha=cfg.lora_alpha)


def make_prepare(
    cfg: AdaptConfig, objective: str, settings, patch: int, num_groups: int, frames: int
):
    """The per-sample view drawer for the data workers."""
    if objective == "dinov2":
        from geoexplora.ssl.dinov2 import CropSizes, DinoV2Views

        return DinoV2Views(patch, CropSizes(cfg.crop_size, local_crop_size(cfg, patch)), settings)
    from geoexplora.ssl.mae import MaeViews

    grid = cfg.crop_size // patch
    return MaeViews(cfg.crop_size, frames * num_groups * grid * grid)


def base_lr(objective: str, settings, global_batch: int) -> float:
    """The recipe's scaling: DINOv2 sqrt(batch / 1024), MAE linear batch / 256."""
    return R.scaled_lr(
        settings.base_lr,
        settings.base_batch,
        global_batch,
        "sqrt" if objective == "dinov2" else "linear",
    )


def optimizer_groups(objective_module, objective: str, settings, depth: int) -> list[dict]:
    """AdamW groups: layer-wise lr decay and the patch-embedding multiplier (the engine's
    :func:`~geoexplora.train.engine.param_groups`); for DINOv2 the prototypes in groups of
    their own, marked ``frozen_until`` (their lr schedule, DINOv2's ``last_layer_lr``)."""
    from geoexplora.train import engine as E

    kw = {
        "num_blocks": depth,
        "layer_decay": settings.layer_decay,
        "lr_multipliers": {"patch_embed": getattr(settings, "patch_embed_lr_mult", 1.0)},
    }
    if objective != "dinov2":
        return E.param_groups(objective_module, **kw)
    last = {id(p) for p in objective_module.last_layer_parameters()}
    named = dict(objective_module.named_parameters())

    def is_last(name: str) -> bool:
        return id(named[name]) in last

    groups = E.param_groups(objective_module, exclude=is_last, **kw)
    frozen = objective_module.freeze_last_layer_steps
    return groups + [
        g | {"frozen_until": frozen}
        for g in E.param_groups(objective_module, exclude=lambda n: not is_last(n), **kw)
    ]


def estimate_memory(
    backbone, objective_module, objective: str, cfg: AdaptConfig, precision: str
) -> dict:
    """Bytes per device: weights, gradients and AdamW state of the trainable parameters, the
    EMA teacher's own copies, and activations (Korthikanti et al.'s 34*D bytes per token per
    block in 16-bit, doubled in 32-bit; attention with a fused kernel). A guide, +-50 %."""
    params = {id(p): p for p in objective_module.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    grads = trainable * 4
    adam = trainable * 8
    dim, depth = backbone.embed_dim, backbone.depth
    p = backbone.num_prefix_tokens
    per_frame = backbone.num_groups * backbone.num_frames

    def tokens(size):
        h, w = backbone.grid_size(size, size)
        return p + per_frame * h * w

    if objective == "dinov2":
        s = objective_module.settings
        seq = s.global_crops * tokens(cfg.crop_size) + s.local_crops * tokens(
            objective_module.crops.local_size
        )
    else:
        total = tokens(cfg.crop_size) - p
        seq = p + int(total * (1 - MAE.mask_ratio)) + tokens(cfg.crop_size)  # encoder + decoder
    bytes_per = 2 if "16" in precision else 4
    activations = int(cfg.batch_size * seq * depth * 34 * dim * bytes_per / 2)
    total = weights + grads + adam + activations
    return {
        "weights": weights,
        "gradients": grads,
        "optimizer_state": adam,
        "activations": activations,
        "total": total,
        "total_gib": round(total / 2**30, 3),
    }


def step_flops(objective_module, dataset, micro_batch: int = 1) -> dict:
    """Forward + backward FLOPs of the actual objective on ``micro_batch`` real samples (views,
    masks and all), counted by :class:`torch.utils.flop_counter.FlopCounterMode` on the CPU:
    matrix products and convolutions (what the GPU spends its time on), student and teacher.
    Returns per-image FLOPs (the count / ``micro_batch``); gradients are dropped afterwards."""
    from torch.utils.data import default_collate
    from torch.utils.flop_counter import FlopCounterMode

    batch = default_collate([dataset[i] for i in range(micro_batch)])
    was_training = objective_module.training
    objective_module.train()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            out = objective_module(batch, 0)
            out["loss"].backward()
    finally:
        objective_module.zero_grad(set_to_none=True)
        objective_module.train(was_training)
    by_op: dict[str, float] = {}
    for op, count in counter.get_flop_counts().get("Global", {}).items():
        name = str(op).split(".")[1] if str(op).count(".") >= 1 else str(op)  # aten.mm.default
        by_op[name] = by_op.get(name, 0) + count / micro_batch
    return {
        "per_image": counter.get_total_flops() / micro_batch,
        "counted_on_images": micro_batch,
        "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
    }


def budget(flops_per_image: float, steps: int, global_batch: int) -> dict:
    """The run against the published one: images seen, FLOPs, and GPU-hours on
    ``SCALE.gpu_name`` at ``SCALE.mfu`` of its bf16 peak."""
    images = steps * global_batch
    published = SCALE.published_steps * SCALE.published_global_batch
    per_step = flops_per_image * global_batch
    total = per_step * steps
    rate = SCALE.gpu_peak_flops * SCALE.mfu
    return {
        "images_seen": images,
        "published_images_seen": published,
        "fraction_of_published": images / published,
        "flops_per_image": flops_per_image,
        "flops_per_step": per_step,
        "total_flops": total,
        "gpu": SCALE.gpu_name,
        "gpu_peak_flops": SCALE.gpu_peak_flops,
        "mfu": SCALE.mfu,
        "images_per_s": rate / flops_per_image if flops_per_image else None,
        "gpu_hours": total / rate / 3600,
        "published_gpu_hours": flops_per_image * published / rate / 3600,
    }


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def _fingerprint(cfg: AdaptConfig, objective: str, world: int, steps: int) -> dict:
    keys = (
        "bands",
        "sensor",
        "init",
        "init_weights",
        "arch_overrides",
        "full",
        "batch_size",
        "accumulate",
        "unfreeze_blocks",
        "lora_rank",
        "lora_alpha",
        "frames",
        "spectral_tokens",
        "split",
        "crop_size",
        "context_factor",
        "local_crop_size",
        "local_crops",
        "head_prototypes",
        "head_hidden",
        "head_bottleneck",
        "lr",
        "warmup_steps",
        "drop_path",
        "seed",
        "settings_overrides",
    )
    fp = {k: getattr(cfg, k) for k in keys}
    fp.update(
        objective=objective,
        world_size=world,
        steps=steps,
        inputs=[_input_name(p) for p in cfg.inputs],
    )
    return fp


def resolve_scale(cfg: AdaptConfig, world: int) -> AdaptConfig:
    """``cfg`` with the run's size filled in: the options given, else the preset's values
    (:data:`geoexplora.defaults.ADAPT_PRESETS`), else the defaults. A global batch (given, or
    the preset's when ``accumulate`` is not) sets ``accumulate = global_batch / (world x
    batch_size)``, which must be a whole number."""
    preset = ADAPT_PRESETS[cfg.preset] if cfg.preset is not None else None
    batch = given_or(cfg.batch_size, preset.batch_size if preset else DATA.batch_size)
    target = cfg.global_batch
    if target is None and preset is not None and cfg.accumulate is None:
        target = preset.global_batch
    per_micro = batch * world
    if target is not None:
        if target < 1 or target % per_micro:
            raise UserError(
                f"{target} is not a whole number of micro-batches of "
                f"{opt('batch_size')} {batch} x {world} device(s) = {per_micro} "
                f"images; choose {opt('global_batch')}, {opt('batch_size')} and "
                f"{opt('devices')} so that it divides",
                option="global_batch",
            )
        accumulate = target // per_micro
        if cfg.accumulate is not None and cfg.accumulate != accumulate:
            raise UserError(
                f"{target} needs {opt('accumulate')} {accumulate} with "
                f"{opt('batch_size')} {batch} x {world} device(s), not "
                f"{cfg.accumulate}; give one of the two",
                option="global_batch",
            )
    else:
        accumulate = given_or(cfg.accumulate, 1)
    steps = cfg.steps
    if steps is None and cfg.epochs is None and preset is not None:
        steps = preset.steps
    return dataclasses.replace(
        cfg,
        batch_size=batch,
        accumulate=accumulate,
        global_batch=None,
        steps=steps,
        head_prototypes=given_or(cfg.head_prototypes, preset.head_prototypes if preset else None),
        local_crops=given_or(cfg.local_crops, preset.local_crops if preset else DINOV2.local_crops),
    )


def scale_warnings(cfg: AdaptConfig, objective: str, settings, world: int) -> list[str]:
    """Warnings about the run's scale (logged once, and listed in the summary)."""
    out = []
    per_step = cfg.batch_size * world
    if (
        objective == "dinov2"
        and settings.centering == "sinkhorn_knopp"
        and per_step < SCALE.min_sinkhorn_batch
    ):
        out.append(
            f"Sinkhorn-Knopp balances the teacher's targets over {per_step} image(s) "
            f"per micro-batch (batch_size {cfg.batch_size} x {world} device(s)), below "
            f"{SCALE.min_sinkhorn_batch} (the published run's 8 x 4 GPUs): its targets "
            "have little to balance; raise batch_size or devices (accumulate does not "
            "help)"
        )
    return out


def _validate(cfg: AdaptConfig) -> None:
    from geoexplora.train import engine as E

    for name in ("batch_size", "accumulate", "global_batch"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise UserError(f"must be at least 1, not {value}", option=name)
    if not cfg.context_factor >= 1:
        raise UserError(f"must be 1 or more, not {cfg.context_factor}", option="context_factor")
    for name in ("num_nodes", "crop_size"):
        if getattr(cfg, name) < 1:
            raise UserError(
                f"--{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}"
            )
    if device_count(cfg.devices) < 1:
        raise UserError(f"{opt('devices')} must be at least 1, not {cfg.devices}")
    E.check_duration(cfg.steps, cfg.epochs)
    require_at_least("--frames", cfg.frames)
    require_positive("--lr", cfg.lr)
    if cfg.lora_rank < 0:
        raise UserError(f"{opt('lora_rank')} must be 0 or more, not {cfg.lora_rank}")
    if cfg.local_crops is not None and cfg.local_crops < 0:
        raise UserError(f"{opt('local_crops')} must be 0 or more, not {cfg.local_crops}")


@reports_progress
def adapt(cfg: AdaptConfig) -> AdaptResult | None:
    """Run (or plan, with ``dry_run``) an ExPLoRA adaptation; see the module docs. Returns None
    on the ranks other than 0 of a multi-process run (rank 0 reports)."""
    import torch

    from geoexplora.io.outputs import check_not_input, check_output
    from geoexplora.memory import check_fits
    from geoexplora.train import engine as E

    _validate(cfg)
    cfg = resolve_scale(cfg, device_count(cfg.devices) * cfg.num_nodes)  # before any process
    output = Path(cfg.output)
    files = E.RunFiles(output)
    check_not_input(
        [output, files.checkpoint, files.log, files.plot],
        [
            *cfg.inputs,
            *(p for p in (cfg.init, cfg.init_weights) if p is not None and Path(p).exists()),
        ],
    )
    if not cfg.dry_run:
        check_output(output, cfg.overwrite)
        files.check(cfg.overwrite, cfg.resume)
    fabric = None
    if not cfg.dry_run:  # first: extra processes start now, and import in parallel with us
        fabric = E.make_fabric(
            E.FabricSettings(
                cfg.accelerator, cfg.devices, cfg.num_nodes, cfg.strategy, cfg.precision
            )
        )
        world = fabric.world_size
        precision = str(getattr(fabric.strategy.precision, "precision", cfg.precision))
    else:
        world = device_count(cfg.devices) * cfg.num_nodes
        precision = cfg.precision or E.default_precision(resolve_accelerator(cfg.accelerator))
    objective = choose_objective(cfg)
    settings = run_settings(cfg, objective)
    warnings = scale_warnings(cfg, objective, settings, world)

    # The patch size decides the crop sizes the data workers draw: build the model first, on
    # the data's bands and statistics (which need the data, but not its views).
    torch.manual_seed(cfg.seed)
    data = load_data(
        cfg, cfg.crop_size, context=cfg.context_factor if objective == "dinov2" else 1.0
    )
    try:
        backbone, report = build_model(
            cfg, objective, settings, data.bands, data.stats, data.frames
        )
        data.dataset.prepare = make_prepare(
            cfg, objective, settings, backbone.patch_size, backbone.num_groups, data.frames
        )

        if fabric is None or fabric.is_global_zero:  # once the inputs are known to be good
            for warning in warnings:
                logger.warning("%s", warning)
        global_batch = R.global_batch(cfg.batch_size, cfg.accumulate, world)
        if data.description["kind"] == "chips" and cfg.batch_size * world > data.epoch_size:
            raise UserError(
                f"{opt('batch_size')} {cfg.batch_size} x {world} device(s) is larger than the "
                f"chips dataset ({data.epoch_size} chips)"
            )
        steps = R.steps_for_images(cfg.steps, cfg.epochs, data.epoch_size, global_batch, DATA.steps)
        objective_module = make_objective(cfg, objective, settings, backbone, steps, data.bands)
        lr = cfg.lr if cfg.lr is not None else base_lr(objective, settings, global_batch)
        warmup = R.warmup_from_fraction(cfg.warmup_steps, settings.warmup_fraction, steps)
        head_params = sum(
            p.numel()
            for n, p in objective_module.named_parameters()
            if p.requires_grad and not n.startswith(("student.backbone.", "backbone."))
        )
        plan = {
            "objective": objective,
            "init": backbone.config["source"],
            "output": str(output),
            "parameters": report,
            "ssl_head_parameters": head_params,
            "steps": steps,
            "global_batch": global_batch,
            "world_size": world,
            "precision": precision,
            "lr": lr,
            "warmup_steps": warmup,
            "data": data.description,
            "bands": [b.key for b in data.bands],
            "frames": data.frames,
            "stats_origin": data.stats["origin"],
            "preset": cfg.preset,
            "batch_size_per_device": cfg.batch_size,
            "accumulate": cfg.accumulate,
            "warnings": warnings,
        }
        if objective == "mae":
            plan["mae_decoder"] = objective_module.decoder_source
        if cfg.dry_run:
            plan["memory_per_device"] = estimate_memory(
                backbone, objective_module, objective, cfg, precision
            )
            flops = step_flops(objective_module, data.dataset)
            plan["budget"] = {
                **budget(flops["per_image"], steps, global_batch),
                "flops_counted": "forward + backward of one CPU micro-batch of "
                f"{flops['counted_on_images']} image(s) "
                "(torch.utils.flop_counter), x the global batch",
                "flops_per_image_by_op": flops["by_op"],
            }
            plan["dry_run"] = True
            return AdaptResult.from_report(plan)
        check_fits(
            estimate_memory(backbone, objective_module, objective, cfg, precision)["total"],
            f"adapting {cfg.crop_size} px crops with {opt('batch_size')} {cfg.batch_size}",
            f"use a smaller {opt('batch_size')} ({opt('accumulate')} keeps the global batch) "
            f"or {opt('crop_size')}",
            fabric.device,
        )

        optimizer = E.build_optimizer(
            optimizer_groups(objective_module, objective, settings, backbone.depth),
            betas=settings.betas,
        )
        wd = settings.weight_decay
        wd_start, wd_end = (wd, wd) if isinstance(wd, (int, float)) else wd
        schedule_kind = E.Schedules
        if objective == "dinov2":
            from geoexplora.ssl.dinov2 import LastLayerSchedules as schedule_kind
        # min(...): a peak below the recipe's floor (e.g. --lr 1e-12) must not rise towards it
        schedules = schedule_kind(
            total_steps=steps,
            lr=lr,
            min_lr=min(settings.min_lr, lr),
            warmup_steps=warmup,
            weight_decay=wd_start,
            weight_decay_end=wd_end,
        )
        loop = E.TrainLoop(
            fabric,
            objective_module,
            optimizer,
            data.dataset,
            E.LoopSettings(
                output=output,
                steps=steps,
                batch_size=cfg.batch_size,
                accumulate=cfg.accumulate,
                clip_grad=settings.clip_grad,
                checkpoint_every=cfg.checkpoint_every,
                seed=cfg.seed,
                num_workers=cfg.num_workers,
                stop_if_stalled=cfg.stop_if_stalled,
                description=f"adapt ({objective})",
            ),
            schedules,
            fingerprint=_fingerprint(cfg, objective, world, steps),
        )
        summary = loop.run(resume=cfg.resume)
        if not fabric.is_global_zero:
            return None
        export = objective_module.teacher["backbone"] if objective == "dinov2" else backbone
        from geoexplora.models.file import save_model

        meta = {
            "provenance": {"command": "adapt", "data": data.description},
            "training": {
                k: plan[k]
                for k in (
                    "objective",
                    "steps",
                    "global_batch",
                    "lr",
                    "warmup_steps",
                    "precision",
                    "world_size",
                )
            }
            | {
                "first_loss": summary["first_loss"],
                "last_loss": summary["last_loss"],
                "exported": "ema_teacher" if objective == "dinov2" else "model",
            },
        }
        save_model(output, export, meta, overwrite=cfg.overwrite)
        logger.info("wrote %s", output)
        warnings = plan["warnings"] + ([summary["stalled"]] if summary["stalled"] else [])
        return AdaptResult.from_report(
            {**plan, **summary, "output": str(output), "warnings": warnings}
        )
    finally:
        data.close()  # the scenes this run opened
