"""The recipe's defaults, in one place, one section per command.

Values marked "recipe" are the faithful ExPLoRA / DINOv2 / MAE values of
``docs/recipe.md`` (the CLI defaults must equal them). Values marked "ours" are choices
the recipe does not make (short runs, small models, multispectral augmentation); each says why.

Sections: ENGINE (the training loop shared by adapt and finetune), ADAPT (data, augmentation,
the two objectives), then the sections of the other commands (finetune, probe, tile) below.
"""

from __future__ import annotations

from dataclasses import dataclass

# --------------------------------------------------------------------------------------------
# ENGINE: geoexplora/train/engine.py (shared by adapt and finetune)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineDefaults:
    strategy_multi_device: str = "ddp"  # "--strategy auto" with >1 device or node
    precision_gpu: str = "bf16-mixed"  # GPUs with bf16; older GPUs get "16-mixed"
    precision_cpu: str = "32-true"
    num_workers: int = 4  # DataLoader workers per process (capped by the CPU count)
    prefetch_factor: int = 4  # batches prefetched per worker
    checkpoint_every: int = 500  # ours: steps between checkpoints (also on SIGINT/SIGTERM)
    max_log_lines: int = 1000  # ours: the JSONL log gets at most ~this many step records
    adamw_eps: float = 1e-8


ENGINE = EngineDefaults()

# --------------------------------------------------------------------------------------------
# ADAPT: geoexplora/commands/adapt.py, geoexplora/ssl/
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExploraDefaults:
    """Which parameters train (recipe section 1)."""

    unfreeze_blocks: tuple[int, ...] = (-1,)  # recipe: the last block, full rank
    lora_rank: int = 64  # recipe
    lora_alpha: float = 1.0  # recipe (scaling alpha/r = 1/64)
    lora_dropout: float = 0.0  # recipe
    lora_targets: tuple[str, ...] = ("q", "v")  # recipe


EXPLORA = ExploraDefaults()


@dataclass(frozen=True)
class DataDefaults:
    batch_size: int = 8  # recipe: 8 per GPU (x 4 GPUs x 32 accumulation = 1024 effective)
    crop_size: int = 224  # recipe: global crop (DINOv2) / image (MAE) size, px
    context_factor: float = 2.0  # DINOv2 crops (global and local) are drawn from a window of
    # this x crop_size where the scenes allow (DINOv2: RandomResizedCrop over the whole image,
    # ~2x 224 px for ImageNet), else from the largest that fits; 1: from a crop_size window
    min_valid_fraction: float = 0.5  # ours: a window needs half its pixels valid to be used
    stats_sample_windows: int = 64  # ours: windows read to compute band statistics
    valid_map_cell: int = 256  # ours: pixel size of the cells of the valid-area map
    steps: int = 1000  # ours: the published run is ~150k steps (4 GPUs, days)


DATA = DataDefaults()


@dataclass(frozen=True)
class ScaleDefaults:
    """How big a run is, against the published one (``--preset``, ``--global-batch`` and the
    budget ``--dry-run`` prints; geoexplora/pipelines/adapt.py)."""

    published_global_batch: int = 1024  # recipe: 8 per GPU x 4 GPUs x 32 accumulation
    published_steps: int = 150_000  # recipe: about 150k iterations
    min_sinkhorn_batch: int = 32  # ours: below this many images per (all-ranks) micro-batch
    # Sinkhorn-Knopp's targets have little to balance; the published run's is 32 (8 x 4 GPUs)
    gpu_name: str = "H100/H200 SXM"  # the GPU class the GPU-hours estimate is for
    gpu_peak_flops: float = 989e12  # its dense bf16 peak, FLOP/s (NVIDIA's data sheet)
    mfu: float = 0.35  # ours: the model-FLOP utilisation assumed for the GPU-hours estimate
    # (ViT-L/14 bf16 training reaches about 0.3-0.45 there; benchmarks/gpu.sh measures it)


SCALE = ScaleDefaults()


@dataclass(frozen=True)
class AdaptPreset:
    """One row of :data:`ADAPT_PRESETS`: what ``--preset NAME`` sets. Options given explicitly
    override it; ``lr`` is not a column: the recipe's base lr is scaled to ``global_batch``
    (DINOv2: sqrt(global_batch / 1024) x 1e-3)."""

    batch_size: int  # images per device per micro-batch
    global_batch: int  # images per optimiser step; accumulation = global / (devices x batch)
    steps: int
    head_prototypes: int | None  # None: by model width (dino_head_size)
    local_crops: int
    why: str


# The presets, as a table (docs/recipe.md renders it).
ADAPT_PRESETS: dict[str, AdaptPreset] = {
    # recipe: every value of the published ViT-L/14 run (section 2): 8 images per GPU, an
    # effective batch of 1024, ~150k iterations, 65 536 prototypes, 8 local crops; lr 1e-3.
    "paper": AdaptPreset(
        batch_size=8,
        global_batch=1024,
        steps=150_000,
        head_prototypes=65536,
        local_crops=8,
        why="recipe: the published run (8/GPU x 4 GPUs x 32 accumulation = "
        "1024, ~150k steps, 65 536 prototypes, lr 1e-3); ~153.6M images",
    ),
    # ours: about one GPU-hour of a ViT-L/14 on an H100/H200 at the stated MFU (see the
    # --dry-run budget): 64 images per micro-batch (what Sinkhorn-Knopp balances; ~45 GiB in
    # bf16 for ViT-L), 256 per step (lr 5e-4 by sqrt scaling), 3000 steps = 768k images,
    # 0.5 % of the published run.
    "quick": AdaptPreset(
        batch_size=64,
        global_batch=256,
        steps=3000,
        head_prototypes=65536,
        local_crops=8,
        why="ours: ~1 GPU-hour for ViT-L/14 on one H100/H200 (768k images, "
        "0.5 % of the published run); micro-batch 64 keeps Sinkhorn-Knopp "
        "well above 32 images",
    ),
}


@dataclass(frozen=True)
class StallDefaults:
    """The "not learning" rule of geoexplora/train/diagnostics.py (all "ours": the recipe has
    none; a 150k-step run that learns nothing should say so in its first minutes)."""

    window: int = 5  # logged records averaged at the start and at the end of the run so far
    # (at least; a quarter of the records once there are more)
    min_records: int = 10  # records needed before the rule may fire (2 windows at least)
    min_drop: float = 0.02  # the learning signal must fall by 2 % (relative) to count as learning
    noise_sigmas: float = 2.0  # ... and by twice the standard error of the two windows' means
    # (a stationary but noisy signal, e.g. of a batch of 2, falls by chance)
    uniform_tolerance: float = 0.01  # a student entropy within 1 % of ln K is a uniform output
    collapse_mass: float = 0.5  # one prototype with half the teacher's mass is a collapse


STALL = StallDefaults()


@dataclass(frozen=True)
class AugmentDefaults:
    """DINOv2's augmentations (recipe section 2), for any bands (geoexplora/ssl/augment.py).
    Geometric ops are exact for any number of bands and dates. For RGB sources (the bands are
    exactly red, green, blue) the colour ops are DINOv2's own: brightness, contrast, saturation
    and hue jitter (p 0.8), grey-scale (p 0.2), solarisation (p 0.2, second global crop). For
    multispectral inputs each has a spectral analogue (ours): saturation blends every band with
    the "spectral grey" (each band's own mean and spread carrying the mean over bands of the
    standardised bands: the spatial pattern without its spectral contrast), grey-scale replaces
    the bands by it, solarisation inverts each band above the middle of its range in the view,
    and hue, which has no multispectral meaning, is left out (the per-band gain plays its part
    of shifting the colour balance)."""

    hflip_p: float = 0.5
    vflip_p: float = 0.5  # overhead imagery has no "up": vertical flips and 90-degree
    rot90_p: float = 0.75  # rotations are as valid as horizontal flips
    jitter_p: float = 0.8  # DINOv2's colour-jitter probability
    brightness: float = 0.4  # whole-image gain in [1-b, 1+b] (DINOv2's brightness)
    contrast: float = 0.4  # contrast around each band's mean, in [1-c, 1+c] (DINOv2's)
    saturation: float = 0.2  # recipe: DINOv2's saturation jitter, factor in [1-s, 1+s]
    hue: float = 0.1  # recipe: DINOv2's hue jitter, a turn of [-h, h] (RGB only)
    band_gain: float = 0.1  # ours: extra independent gain per band in [1-g, 1+g]
    grayscale_p: float = 0.2  # recipe: DINOv2's RandomGrayscale (every crop)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels (DINOv2's GaussianBlur)
    blur_p_global: tuple[float, float] = (1.0, 0.1)  # DINOv2: first/second global crop
    blur_p_local: float = 0.5  # DINOv2
    solarize_p_global: tuple[float, float] = (0.0, 0.2)  # recipe: DINOv2 solarises the second
    # global crop only (threshold 128 of 255: the middle of the range)
    solarize_p_local: float = 0.0  # recipe


AUGMENT = AugmentDefaults()


@dataclass(frozen=True)
class DinoV2Defaults:
    """DINO + iBOT + KoLeo with an EMA teacher (recipe section 2).

    Short runs (ours). The recipe's schedules are set in epochs of a ~150k-step run; here each
    is a fraction of the run, so a run of any length gets the same shape: lr warm-up 10 %,
    teacher-temperature warm-up 30 %, weight decay and EMA momentum cosines over the whole run,
    and the head's last layer frozen for ``min(freeze_last_layer_steps,
    freeze_last_layer_fraction x steps)`` steps (3000 would freeze it for the whole of a short
    run, and the prototypes would never move). The EMA momentum keeps the recipe's 0.992 -> 1:
    in 300-step from-scratch runs of the tiny test ViT a faster teacher (0.97 -> 1) changed
    neither the DINO loss nor the teacher's entropy.

    From-scratch pre-training of a shallow model: build it with LayerScale gammas of 1.0
    (``AdaptConfig.arch_overrides={"init_values": 1.0}``), not timm's DINOv2 1e-5. With 1e-5 a
    random 4-block ViT is nearly the identity, every image gets the same class token,
    Sinkhorn-Knopp returns uniform targets and the DINO loss stays at ln(prototypes).
    """

    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    momentum: tuple[float, float] = (0.992, 1.0)  # cosine
    teacher_temp: tuple[float, float] = (0.04, 0.07)  # warm-up
    teacher_temp_warmup_fraction: float = 0.3  # DINOv2: 30 of 100 epochs
    student_temp: float = 0.1
    centering: str = "sinkhorn_knopp"  # or "centering" (running mean, momentum 0.9)
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    global_crops: int = 2
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops: int = 8
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    global_crop_patches: int = 16  # 224 px for patch 14
    local_crop_patches: int = 7  # 98 px for patch 14
    mask_probability: float = 0.5  # iBOT: fraction of global crops masked
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # iBOT: masked fraction of patches, uniform
    freeze_last_layer_steps: int = 3000  # recipe
    freeze_last_layer_fraction: float = 0.02  # ours: 3000 of ~150k; caps it for short runs
    base_lr: float = 1e-3  # recipe: for an effective batch of 1024, sqrt scaling
    base_batch: int = 1024
    min_lr: float = 1e-6
    warmup_fraction: float = 0.1  # DINOv2: 10 of 100 epochs
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: tuple[float, float] = (0.04, 0.4)  # cosine
    clip_grad: float = 3.0
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    drop_path: float = 0.3
    drop_path_uniform: bool = True  # recipe: DINOv2's drop_path_uniform, 0.3 in every block
    # (timm's default is a linear ramp 0 -> 0.3 over the depth)
    prototype_gain_trainable: bool = True  # recipe: DINOv2's weight_norm with a trainable g
    separate_clips: bool = True  # recipe: DINOv2 clips the backbone and the head separately
    # (each at clip_grad); False: one clip over all trainable parameters


DINOV2 = DinoV2Defaults()


@dataclass(frozen=True)
class DinoHeadSize:
    hidden: int
    bottleneck: int
    prototypes: int


def dino_head_size(embed_dim: int) -> DinoHeadSize:
    """DINO/iBOT head size by backbone width.

    The paper's head (hidden 2048, bottleneck 256, 65 536 prototypes) has 16.8M parameters in its
    last layer alone: right for ViT-L (18.7M trained backbone parameters), far too big for a
    small model. ViT-L and ViT-B get the recipe's head; smaller widths fewer prototypes (ours:
    ViT-S 16 384; tiny test models a tiny head so a CPU run stays fast). ``--head-prototypes`` etc. override these.
    """
    if embed_dim >= 1024:  # ViT-L, ViT-g: the paper's values
        return DinoHeadSize(2048, 256, 65536)
    if embed_dim >= 768:  # ViT-B: the recipe's 65 536 too
        return DinoHeadSize(2048, 256, 65536)
    if embed_dim >= 384:  # ViT-S
        return DinoHeadSize(2048, 256, 16384)
    return DinoHeadSize(256, 64, 1024)  # tiny models (tests, CPU demos)


@dataclass(frozen=True)
class MaeDefaults:
    """Masked autoencoding (recipe section 2, MAE sources)."""

    mask_ratio: float = 0.75
    norm_pix_loss: bool = True  # MAE's default for its released models
    decoder_lora_rank: int = 8  # the source decoder, when present, is LoRA-tuned (q, v)
    decoder_dim: int = 512  # a new light decoder when the source has none (MAE's is 512 x 8)
    decoder_depth: int = 2  # ours: "light"; MAE's own decoder has 8 blocks
    decoder_heads: int = 16
    base_lr: float = 4.5e-4  # per 256 images, linear scaling
    base_batch: int = 256
    min_lr: float = 0.0
    warmup_fraction: float = 0.05  # recipe: 1 epoch; streamed scenes have no epochs
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    clip_grad: float | None = None
    layer_decay: float = 1.0
    drop_path: float = 0.0


MAE = MaeDefaults()

# --------------------------------------------------------------------------------------------
# FINETUNE: appended by the finetune command's owner.
# PROBE: appended by the probe command's owner.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneDefaults:
    """Fine-tuning (recipe section 3, "Fine-tune (PEFT)"); geoexplora/pipelines/finetune.py."""

    mode: str = "lora"  # recipe: LoRA on q,v of all blocks + a new head
    lora_rank: int = 8  # recipe
    lora_alpha: float = 1.0  # recipe
    lora_targets: tuple[str, ...] = ("q", "v")  # recipe
    explora_unfreeze_blocks: tuple[int, ...] = (-1,)  # "explora" mode: last block + LoRA
    head_init_std: float = 2e-5  # recipe
    pooling: str = "mean"  # recipe: mean-pooled patch tokens
    base_lr: float = 5e-4  # recipe: for a batch of 128, linear scaling
    base_batch: int = 128  # recipe
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0  # recipe: 5 warm-up epochs ...
    warmup_max_fraction: float = 0.1  # ours: ... but at most 10% of a short run
    weight_decay: float = 0.05  # ours: the recipe names none; MAE/BEiT fine-tuning's value
    betas: tuple[float, float] = (0.9, 0.999)
    label_smoothing: float = 0.1  # recipe
    drop_path: float = 0.2  # recipe
    clip_grad: float | None = None
    batch_size: int = 32  # ours: per device; fits a ViT-L at 224 px on a 16 GB GPU
    epochs: int = 20  # ours: when neither --steps nor --epochs is given
    eval_every_epochs: float = 1.0  # ours: validation (early stopping, best checkpoint)
    patience: int = 5  # ours: evaluations without improvement before stopping
    class_weighting: str = "inverse_sqrt"  # ours: loss weights ~ 1/sqrt(frequency)
    segmentation_hidden: int = 64  # ours: width of the light segmentation decoder


FINETUNE = FinetuneDefaults()


@dataclass(frozen=True)
class ProbeDefaults:
    """Linear probe and k-NN (recipe section 3; DINOv2's linear evaluation);
    geoexplora/pipelines/probe.py."""

    features: tuple[str, ...] = ("cls", "cls4", "cls+mean", "cls4+mean")  # DINOv2's grid
    learning_rates: tuple[float, ...] = (
        1e-4,
        2e-4,
        5e-4,
        1e-3,
        2e-3,
        5e-3,
        1e-2,
        2e-2,
        5e-2,
        0.1,
    )  # recipe: {1e-4 ... 0.1} x batch/256
    momentum: float = 0.9  # recipe (SGD, no weight decay, cosine)
    head_init_std: float = 0.01  # recipe
    batch_size: int = 256  # the lr grid's reference batch (capped by the training set)
    steps: int = 1000  # ours: DINOv2 runs 12 500 iterations on ImageNet; cached features make
    # the heads cheap, and small datasets converge long before
    knn_k: int = 20  # recipe (DINOv2's k-NN)
    knn_temperature: float = 0.07  # DINOv2's k-NN temperature
    extract_batch_size: int = 64  # ours: frozen forward passes, memory bound
    val_fraction: float = 0.2  # ours: taken from train (stratified) when there is no val split


PROBE = ProbeDefaults()

# --------------------------------------------------------------------------------------------
# TILE: geoexplora/pipelines/tile/, geoexplora/commands/tile.py
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileDefaults:
    size: int = 224  # recipe: chips are the training window (DataDefaults.crop_size)
    val_fraction: float = 0.1  # ours: a validation split for early stopping and model choice
    test_fraction: float = 0.0  # ours: a test split only when asked for
    max_nodata: float = 0.5  # ours: as DataDefaults.min_valid_fraction, from the other side
    min_label_fraction: float = 0.0  # ours: the majority class labels a chip, however small


TILE = TileDefaults()

# --------------------------------------------------------------------------------------------
# PREDICT and EMBED: geoexplora/pipelines/predict.py, geoexplora/pipelines/embed.py
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictDefaults:
    batch_size: int = 8  # ours: windows per forward pass
    blend: str = "cosine"  # ours: flat centre, cosine ramps over the overlap
    prefetch: int = 4  # ours: batches read ahead of the forward pass
    pca_sample_windows: int = 32  # ours: windows embed's --pca projection is fitted on


PREDICT = PredictDefaults()

# --------------------------------------------------------------------------------------------
# EXPORT: geoexplora/pipelines/export.py (ONNX export and its check against PyTorch)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportDefaults:
    """ONNX export: the exported model is run by onnxruntime (CPU) on a random input and must
    match the PyTorch model: max abs diff <= onnx_atol + onnx_rtol x max |PyTorch output|."""

    onnx_opset: int = 18  # ours: ONNX opset; onnxruntime >= 1.14 runs it
    onnx_atol: float = 1e-4  # ours: float32 ViT outputs agree to ~1e-6 on CPU; 100x margin
    onnx_rtol: float = 1e-3  # ours: large logits (ViT-L heads) differ by more in absolute terms
    check_batch: int = 2  # ours: random images in the check (the batch axis is dynamic)


EXPORT = ExportDefaults()

# --------------------------------------------------------------------------------------------
# DEMO: geoexplora/pipelines/demo.py (a few minutes on 2 CPU cores)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoDefaults:
    adapt_steps: int = 400  # ours: enough for the tiny source's loss to fall visibly
    finetune_steps: int = 200
    probe_steps: int = 300  # per head of the probe's learning-rate grid
    batch_size: int = 16


DEMO = DemoDefaults()

# --------------------------------------------------------------------------------------------
# MEMORY: geoexplora/memory.py (the guard every verb runs on its plan before allocating it)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryDefaults:
    # ours: a plan may take this share of the memory the machine has available when it starts
    # (the rest for the Python process itself, the OS page cache and estimate error); above it
    # the run is refused with the estimate instead of being killed by the OOM killer or swapping.
    usable_fraction: float = 0.8


MEMORY = MemoryDefaults()

# Experiment trackers (--logger): where their files go, and the MLflow/W&B project name.
TRACKER_LOG_DIR = "geoexplora-runs"
TRACKER_PROJECT = "geoexplora"
