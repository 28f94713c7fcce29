"""Fine-tuning a backbone for a task on a chips dataset, on the shared Fabric engine.

Tasks: scene ``classification`` (one class per chip), ``multilabel`` (per-class sigmoid) and
``segmentation`` (per pixel). The heads are ``geoexplora.models.heads``: a linear head on the
mean-pooled patch tokens (the recipe's choice) for scenes; for segmentation a light decoder on
the last block's patch tokens (1x1 projection, bilinear upsampling to the chip size, a 3x3
refinement conv, 1x1 classifier). A light decoder keeps what is measured the backbone's
features, and trains fast; UperNet-style multi-scale decoders would dwarf a LoRA-tuned backbone.

Modes (what trains):

* ``lora`` (the paper's PEFT default): LoRA rank 8, alpha 1 on Q and V of every block, and the
  head; nothing else (norms and tokens stay frozen).
* ``explora``: the ExPLoRA parameterisation: last block in full, LoRA on Q/V of the others,
  all norms and the cls/register tokens, and the head.
* ``linear``: the head only (the backbone frozen).
* ``full``: everything.

Recipe (``geoexplora.defaults.FINETUNE``): AdamW, cosine with warm-up, label smoothing 0.1,
drop-path 0.2, lr 5e-4 per batch 128 (linearly scaled). Imbalanced classes get loss weights
(inverse square root of the training frequency, by default). The validation split is evaluated
every ``eval_every`` steps (at each engine checkpoint): the best weights are kept in
``OUT-stem.best.pt`` and training stops after ``patience`` evaluations without improvement. The
output model carries the best weights (LoRA merged), the head, classes and colours, the metrics
and the training data's provenance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from geoexplora.config_checks import one_of
from geoexplora.defaults import FINETUNE, PROBE
from geoexplora.errors import RuntimeFailure, UserError, opt
from geoexplora.io.chips import IGNORE_INDEX, ChipsDataset
from geoexplora.log import Progress, logger, reports_progress
from geoexplora.results import FinetuneResult
from geoexplora.train import metrics as M
from geoexplora.train import recipe as R
from geoexplora.train.features import ModelInputs, valid_frames
from geoexplora.train.tracking import log_record

Task = Literal["classification", "multilabel", "segmentation"]
Mode = Literal["lora", "linear", "full", "explora"]
TASKS: tuple[str, ...] = get_args(Task)
MODES: tuple[str, ...] = get_args(Mode)
CLASS_WEIGHTINGS = ("inverse_sqrt", "inverse", "none")
# The validation metric that decides the best checkpoint and early stopping, per task.
MONITOR = {"classification": "macro_f1", "multilabel": "map", "segmentation": "miou"}


@dataclass
class FinetuneConfig:
    """``geoexplora finetune MODEL CHIPS -o OUT``; defaults in ``geoexplora.defaults.FINETUNE``."""

    model: Path  # a model file, or a spec (a registry/timm name, torchgeo:ENUM)
    chips: Path
    output: Path
    init_weights: str | None = None  # for a model given by name: a checkpoint, or "random"
    bands: list[str] | None = None  # for a model given by name: chips' bands to build on
    task: Task | None = None  # None: the dataset's task
    mode: Mode = FINETUNE.mode  # type: ignore[assignment]
    steps: int | None = None  # at most one of steps / epochs; neither: FINETUNE.epochs
    epochs: float | None = None
    batch_size: int = FINETUNE.batch_size  # per device
    accumulate: int = 1
    lr: float | None = None  # None: FINETUNE.base_lr x global batch / FINETUNE.base_batch
    min_lr: float = FINETUNE.min_lr
    warmup_steps: int | None = None  # None: FINETUNE.warmup_epochs, capped (see defaults)
    weight_decay: float = FINETUNE.weight_decay
    label_smoothing: float = FINETUNE.label_smoothing
    drop_path: float = FINETUNE.drop_path
    clip_grad: float | None = FINETUNE.clip_grad
    lora_rank: int = FINETUNE.lora_rank
    lora_alpha: float = FINETUNE.lora_alpha
    class_weighting: str = FINETUNE.class_weighting
    augment: bool = True  # flips and 90-degree rotations (exact for images and masks)
    eval_every: int | None = None  # steps; None: every FINETUNE.eval_every_epochs epochs
    patience: int = FINETUNE.patience
    val_fraction: float = PROBE.val_fraction  # held out of train when there is no val split
    accelerator: str = "auto"
    devices: int | str | list[int] = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None
    num_workers: int | None = None
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    progress: Progress = True  # False, or a callback (see geoexplora.log)

    def __post_init__(self):
        one_of("task", self.task, Task, optional=True)
        one_of("mode", self.mode, Mode)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def dataset_task(meta_task: str, requested: str | None, root: Path) -> str:
    """The task to train: ``requested`` or the dataset's own; UserError when the dataset cannot
    serve it."""
    task = requested or meta_task
    if task not in TASKS:
        raise UserError(
            f"{opt('task')} {task}: use one of {', '.join(TASKS)}"
            if requested
            else f"{root}: an unlabelled chips dataset (task "
            f"'{meta_task}'); tile with {opt('labels')} to fine-tune"
        )
    if task == "segmentation" and meta_task != "segmentation":
        raise UserError(
            f"{opt('task')} segmentation: {root} has no masks (task '{meta_task}'); tile "
            f"it with {opt('task')} segmentation"
        )
    if task == "multilabel" and meta_task != "multilabel":
        raise UserError(
            f"{opt('task')} multilabel: {root} has no multi-label chips (task "
            f"'{meta_task}'); tile it with {opt('task')} multilabel"
        )
    return task


def labelled_indices(dataset: ChipsDataset, task: str) -> list[int]:
    """Chips that carry a target for ``task`` (segmentation: every chip with a mask; the mask's
    255 pixels are ignored)."""
    if task == "classification":
        return [i for i, y in enumerate(dataset.labels.tolist()) if y >= 0]
    if task == "multilabel":
        text = dataset.index["labels"].tolist()
        return [i for i, t in enumerate(text) if isinstance(t, str) and t]
    return [i for i, p in enumerate(dataset.index["mask_path"].tolist()) if isinstance(p, str)]


def ignore_nodata(mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Set to 255 the mask pixels whose image pixel is nodata in every frame (a pixel is valid in
    a frame when all its bands are finite). ``image`` (..., T, C, H, W), ``mask`` (..., H, W)."""
    valid = torch.isfinite(image).all(dim=-3).any(dim=-3)
    return torch.where(valid, mask, torch.full_like(mask, IGNORE_INDEX))


def dihedral(item: dict, k: int, flip: bool) -> dict:
    """Rotate by ``k`` quarter turns, then flip left-right: image and mask alike (exact)."""
    out = dict(item)
    for key in ("image", "mask"):
        if key in out:
            x = torch.rot90(out[key], k, dims=(-2, -1))
            out[key] = torch.flip(x, dims=(-1,)) if flip else x
    return out


class TrainStream(torch.utils.data.Dataset):
    """The labelled training chips as an endless, seeded stream over global sample indices (the
    engine's contract: item ``i`` depends only on ``i``), with dihedral augmentation."""

    def __init__(self, inputs: ModelInputs, indices: list[int], seed: int, augment: bool):
        from geoexplora.train.engine import EpochIndex

        self.inputs = inputs
        self.indices = indices
        self.order = EpochIndex(len(indices), seed)
        self.seed = seed
        self.augment = augment

    def __len__(self) -> int:  # the sampler decides how many items are drawn
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        from geoexplora.train.engine import sample_rng

        _, pos = self.order.epoch_and_item(i)
        item = self.inputs[self.indices[pos]]
        item.pop("chip_id", None)
        if "mask" in item:
            item["mask"] = ignore_nodata(item["mask"], item["image"])
        if self.augment:
            rng = sample_rng(self.seed, i)
            item = dihedral(item, int(rng.integers(0, 4)), bool(rng.random() < 0.5))
        return item


class EvalSet(torch.utils.data.Dataset):
    """The labelled chips of an evaluation split, un-augmented."""

    def __init__(self, inputs: ModelInputs, indices: list[int]):
        self.inputs, self.indices = inputs, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        item = self.inputs[self.indices[i]]
        item.pop("chip_id", None)
        if "mask" in item:
            item["mask"] = ignore_nodata(item["mask"], item["image"])
        return item


def holdout_val(
    dataset: ChipsDataset, indices: list[int], task: str, fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train, val) chip indices: ``fraction`` of the labelled training chips held out, stratified
    by the chip label (for segmentation the chips' majority class)."""
    from geoexplora.pipelines.probe import stratified_holdout

    if len(indices) < 2:
        raise UserError(
            f"{dataset.root}: {len(indices)} labelled training chip(s) and no val "
            "split; fine-tuning needs more"
        )
    labels = torch.as_tensor(dataset.labels[indices])
    held = stratified_holdout(labels, fraction, seed, multilabel=task == "multilabel")
    return (
        [i for i, h in zip(indices, held.tolist()) if not h],
        [i for i, h in zip(indices, held.tolist()) if h],
    )


def class_frequencies(
    dataset: ChipsDataset, indices: list[int], task: str, num_classes: int
) -> torch.Tensor:
    """Training counts per class: chips (classification), positive chips (multilabel) or
    labelled pixels (segmentation; reads the masks once)."""
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for i in indices:
        if task == "classification":
            counts[int(dataset.labels[i])] += 1
        elif task == "multilabel":
            counts += torch.from_numpy(dataset.multi_hot(i)).double()
        else:
            mask = torch.from_numpy(dataset.read_mask(i).astype("int64"))
            counts += torch.bincount(mask[mask != IGNORE_INDEX], minlength=num_classes)[
                :num_classes
            ].double()
    return counts


def class_weights(counts: torch.Tensor, weighting: str) -> torch.Tensor:
    """Loss weight per class, mean 1 over the classes seen in training (unseen classes: 1).

    ``inverse``: 1 / frequency; ``inverse_sqrt``: 1 / sqrt(frequency), gentler; ``none``: 1.
    """
    weights = torch.ones_like(counts)
    seen = counts > 0
    if weighting == "none" or not seen.any():
        return weights.float()
    power = 1.0 if weighting == "inverse" else 0.5
    raw = (counts[seen].sum() / counts[seen]) ** power
    weights[seen] = raw / raw.mean()
    return weights.float()


def positive_weights(positives: torch.Tensor, n: int, weighting: str) -> torch.Tensor:
    """Multilabel: the weight of each class's positive term (``pos_weight``), from the ratio of
    negative to positive training chips: ratio (``inverse``), sqrt(ratio) (``inverse_sqrt``) or
    1 (``none``)."""
    if weighting == "none":
        return torch.ones_like(positives).float()
    ratio = (n - positives).clamp(min=1) / positives.clamp(min=1)
    return (ratio if weighting == "inverse" else ratio.sqrt()).float()


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def set_drop_path(vit, rate: float) -> None:
    """Stochastic depth rising linearly to ``rate`` at the last block (timm's rule)."""
    from timm.layers import DropPath

    blocks = vit.vit.blocks
    for i, block in enumerate(blocks):
        r = rate * i / max(1, len(blocks) - 1)
        for name in ("drop_path1", "drop_path2"):
            if hasattr(block, name):
                setattr(block, name, DropPath(r) if r > 0 else nn.Identity())


def build_task_model(backbone, task: str, classes: list[dict]):
    from geoexplora.models.heads import LinearHead, SegmentationHead, TaskModel

    k = len(classes)
    if task == "segmentation":
        head = SegmentationHead(backbone.embed_dim, k, hidden=FINETUNE.segmentation_hidden)
    else:
        head = LinearHead(
            backbone.embed_dim, k, pooling=FINETUNE.pooling, init_std=FINETUNE.head_init_std
        )
    return TaskModel(backbone, head, task, classes)


def parameterise(model, mode: str, lora_rank: int, lora_alpha: float) -> dict:
    """Set what trains for ``mode`` (in place); returns the parameter report."""
    from geoexplora.models import apply_explora, parameter_report

    if mode not in MODES:
        raise UserError(f"{opt('mode')} {mode}: use one of {', '.join(MODES)}")
    backbone = model.backbone
    if mode == "lora":
        apply_explora(
            model,
            unfreeze_blocks=(),
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_targets=FINETUNE.lora_targets,
            train_embedding=False,
            record_as="finetune_lora",
        )
        for name, p in model.backbone.named_parameters():  # LoRA only: norms, tokens frozen
            p.requires_grad_("lora_" in name)
    elif mode == "explora":
        apply_explora(
            model,
            unfreeze_blocks=FINETUNE.explora_unfreeze_blocks,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_targets=FINETUNE.lora_targets,
            train_embedding=False,
            record_as="finetune_explora",
        )
    elif mode == "linear":
        model.requires_grad_(False)
        model.head.requires_grad_(True)
    else:
        model.requires_grad_(True)
    report = parameter_report(model)
    stage = {"lora": "finetune_lora", "explora": "finetune_explora"}.get(mode)
    if stage:
        backbone.config[stage]["parameters"] = report
    return report


# ---------------------------------------------------------------------------------------------
# Objective and evaluation
# ---------------------------------------------------------------------------------------------


def _forward(model, batch: dict) -> torch.Tensor:
    x = batch["image"]
    multi = model.backbone.num_frames > 1
    return model(
        x, dates=batch["dates"] if multi else None, frame_mask=valid_frames(x) if multi else None
    )


class EarlyStopping(nn.Module):
    """The best validation score so far, its step, and the evaluations since it: buffers, so
    they travel in the training checkpoint and a resumed run continues counting where it
    stopped. A score that is not a number never counts as an improvement."""

    def __init__(self, patience: int):
        super().__init__()
        self.patience = patience
        self.register_buffer("best_score", torch.tensor(-math.inf, dtype=torch.float64))
        self.register_buffer("best_step", torch.tensor(-1, dtype=torch.int64))
        self.register_buffer("evals_since_best", torch.tensor(0, dtype=torch.int64))

    def update(self, score: float, step: int) -> bool:
        """Record one evaluation; whether it is the best so far."""
        improved = math.isfinite(score) and score > float(self.best_score)
        if improved:
            self.best_score.fill_(score)
            self.best_step.fill_(step)
            self.evals_since_best.zero_()
        else:
            self.evals_since_best += 1
        return improved

    @property
    def exhausted(self) -> bool:
        """``patience`` evaluations in a row without an improvement."""
        return int(self.evals_since_best) >= self.patience


class FinetuneObjective(nn.Module):
    """The engine's objective: the task model, its loss, and the early-stopping state."""

    def __init__(
        self,
        model,
        task: str,
        weights: torch.Tensor,
        label_smoothing: float,
        patience: int = FINETUNE.patience,
    ):
        super().__init__()
        self.model = model
        self.task = task
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weights", weights)
        self.stopping = EarlyStopping(patience)

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        if self.task == "classification":
            return F.cross_entropy(
                logits.float(),
                batch["label"],
                weight=self.class_weights,
                label_smoothing=self.label_smoothing,
            )
        if self.task == "multilabel":
            target = batch["labels"] * (1 - self.label_smoothing) + self.label_smoothing / 2
            return F.binary_cross_entropy_with_logits(
                logits.float(), target, pos_weight=self.class_weights
            )
        return F.cross_entropy(
            logits.float(),
            batch["mask"],
            weight=self.class_weights,
            ignore_index=IGNORE_INDEX,
            label_smoothing=self.label_smoothing,
        )

    def forward(self, batch: dict, step: int) -> dict:
        logits = _forward(self.model, batch)
        return {"loss": self.loss(logits, batch)}


class Evaluator:
    """Accumulates predictions of one split into the task's metrics (bounded memory: confusion
    matrices; multilabel keeps the (N, K) scores)."""

    def __init__(self, task: str, num_classes: int):
        self.task, self.k = task, num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.scores: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, batch: dict) -> None:
        logits = logits.float().cpu()
        if self.task == "multilabel":
            self.scores.append(logits)
            self.targets.append(batch["labels"].cpu())
        elif self.task == "classification":
            self.confusion += M.confusion_matrix(logits.argmax(1), batch["label"].cpu(), self.k)
        else:
            self.confusion += M.confusion_matrix(
                logits.argmax(1), batch["mask"].cpu(), self.k, ignore_index=IGNORE_INDEX
            )

    def result(self) -> dict:
        if self.task == "multilabel":
            return M.multilabel_metrics(torch.cat(self.scores), torch.cat(self.targets))
        if self.task == "classification":
            return {
                **M.classification_metrics(self.confusion),
                "confusion_matrix": self.confusion.tolist(),
            }
        return {
            **M.segmentation_metrics(self.confusion),
            "confusion_matrix": self.confusion.tolist(),
        }


@torch.no_grad()
def evaluate(
    model,
    dataset,
    task: str,
    num_classes: int,
    batch_size: int,
    device,
    autocast=None,
    num_workers: int = 0,
) -> dict:
    """The task's metrics of ``model`` on ``dataset`` (an :class:`EvalSet`)."""
    import contextlib

    from torch.utils.data import DataLoader

    was_training = model.training
    model.eval()
    evaluator = Evaluator(task, num_classes)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for batch in loader:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = _forward(model, batch)
        evaluator.update(logits, batch)
    model.train(was_training)
    return evaluator.result()


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _check_config(cfg: FinetuneConfig) -> None:
    from geoexplora.train import engine as E

    E.check_duration(cfg.steps, cfg.epochs)
    if cfg.mode not in MODES:
        raise UserError(f"{opt('mode')} {cfg.mode}: use one of {', '.join(MODES)}")
    if cfg.class_weighting not in CLASS_WEIGHTINGS:
        raise UserError(
            f"{opt('class_weights')} {cfg.class_weighting}: use one of "
            f"{', '.join(CLASS_WEIGHTINGS)}"
        )
    if cfg.batch_size < 1:
        raise UserError(f"{opt('batch_size')} must be at least 1, not {cfg.batch_size}")
    if cfg.patience < 1:
        raise UserError(f"{opt('patience')} must be at least 1, not {cfg.patience}")
    if cfg.eval_every is not None and cfg.eval_every < 1:
        raise UserError(f"{opt('eval_every')} must be at least 1, not {cfg.eval_every}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise UserError(f"{opt('lr')} must be positive, not {cfg.lr}")
    if not 0 <= cfg.label_smoothing < 1:
        raise UserError(f"{opt('label_smoothing')} must lie in [0, 1), not {cfg.label_smoothing}")
    if not 0 <= cfg.drop_path < 1:
        raise UserError(f"{opt('drop_path')} must lie in [0, 1), not {cfg.drop_path}")
    if cfg.mode in ("lora", "explora") and cfg.lora_rank < 1:
        raise UserError(f"{opt('lora_rank')} must be at least 1, not {cfg.lora_rank}")


def _best_path(output: Path) -> Path:
    return output.with_name(output.stem + ".best.pt")


def _trainable_state(model) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().cpu().clone() for n, t in model.state_dict().items() if n in names}


def _named(values: list[float], classes: list[dict]) -> dict[str, float]:
    return {c["name"]: v for c, v in zip(classes, values)}


def summarise_metrics(metrics: dict | None, task: str, classes: list[dict]) -> dict | None:
    """The headline numbers of a metrics dict, per-class values keyed by class name."""
    if metrics is None:
        return None
    if task == "segmentation":
        keys = ("miou", "pixel_accuracy", "macro_f1")
        per_class = {"per_class_iou": _named(metrics["per_class_iou"], classes)}
    elif task == "multilabel":
        keys = ("map", "macro_f1", "micro_f1", "top1")
        per_class = {"per_class_ap": _named(metrics["per_class_ap"], classes)}
    else:
        keys = ("top1", "balanced_accuracy", "macro_f1")
        per_class = {}
    out = {k: metrics[k] for k in keys}
    out["per_class_f1"] = _named(metrics["per_class_f1"], classes)
    out.update(per_class)
    if "confusion_matrix" in metrics:
        out["confusion_matrix"] = metrics["confusion_matrix"]
    out["count"] = metrics["count"]
    return out


@dataclass
class FinetuneData:
    """The chips dataset as fine-tuning sees it: its task and classes, the three splits and the
    labelled chips of each (val held out of train, stratified, when the dataset has none)."""

    meta: dict
    task: str
    classes: list[dict]
    splits: dict[str, ChipsDataset]
    indices: dict[str, list[int]]
    val_from_train: bool


def load_finetune_data(cfg: FinetuneConfig) -> FinetuneData:
    from geoexplora.io.chips import load_dataset_meta

    meta = load_dataset_meta(cfg.chips)
    task = dataset_task(meta["task"], cfg.task, Path(cfg.chips))
    classes = meta.get("classes") or []
    if len(classes) < 2:
        raise UserError(
            f"{cfg.chips}: fine-tuning needs at least two classes; it has {len(classes)}"
        )
    splits = {name: ChipsDataset(cfg.chips, split=name) for name in ("train", "val", "test")}
    indices = {name: labelled_indices(ds, task) for name, ds in splits.items()}
    if not indices["train"]:
        raise UserError(f"{cfg.chips}: no labelled chips in the train split")
    val_from_train = not indices["val"]
    if val_from_train:
        indices["train"], indices["val"] = holdout_val(
            splits["train"], indices["train"], task, cfg.val_fraction, cfg.seed
        )
        splits["val"] = splits["train"]
        logger.warning(
            "%s has no val split: %.0f%% of the train chips (stratified) are held out "
            "for validation",
            cfg.chips,
            100 * cfg.val_fraction,
        )
    return FinetuneData(meta, task, classes, splits, indices, val_from_train)


@dataclass(frozen=True)
class FinetuneSchedule:
    """How long and how fast (see :mod:`geoexplora.train.recipe`): steps, epochs, lr, warm-up
    and how often the val split is scored (each evaluation is also a checkpoint)."""

    global_batch: int
    steps_per_epoch: int
    steps: int
    lr: float
    warmup: int
    eval_every: int

    @property
    def epochs(self) -> float:
        return self.steps / self.steps_per_epoch


def finetune_schedule(cfg: FinetuneConfig, n_train: int, world: int) -> FinetuneSchedule:
    global_batch = R.global_batch(cfg.batch_size, cfg.accumulate, world)
    per_epoch = R.steps_per_epoch(n_train, global_batch)
    steps = R.steps_for_epochs(cfg.steps, cfg.epochs, per_epoch, FINETUNE.epochs)
    lr = (
        cfg.lr
        if cfg.lr is not None
        else R.scaled_lr(FINETUNE.base_lr, FINETUNE.base_batch, global_batch, "linear")
    )
    warmup = R.warmup_from_epochs(
        cfg.warmup_steps, FINETUNE.warmup_epochs, per_epoch, FINETUNE.warmup_max_fraction, steps
    )
    eval_every = cfg.eval_every or max(1, round(FINETUNE.eval_every_epochs * per_epoch))
    return FinetuneSchedule(global_batch, per_epoch, steps, lr, warmup, eval_every)


def build_objective(cfg: FinetuneConfig, model_path: Path, data: FinetuneData):
    """The task model on the backbone (LoRA/linear/full as ``cfg.mode``), its class-weighted
    loss: ``(objective, band index, trainable-parameter report, class weights)``."""
    from geoexplora.train.features import backbone_for_dataset

    backbone, band_index = backbone_for_dataset(model_path, data.splits["train"])
    if cfg.drop_path > 0 and cfg.mode != "linear":
        set_drop_path(backbone, cfg.drop_path)
    model = build_task_model(backbone, data.task, data.classes)
    report = parameterise(model, cfg.mode, cfg.lora_rank, cfg.lora_alpha)
    train = data.indices["train"]
    counts = class_frequencies(data.splits["train"], train, data.task, len(data.classes))
    if data.task == "multilabel":
        weights = positive_weights(counts, len(train), cfg.class_weighting)
    else:
        weights = class_weights(counts, cfg.class_weighting)
    objective = FinetuneObjective(model, data.task, weights, cfg.label_smoothing, cfg.patience)
    return objective, band_index, report, weights


class Validation:
    """The loop's checkpoint hook: score the val split, keep the best weights (``best_path``,
    rank 0), and say when early stopping ends the run."""

    def __init__(
        self,
        objective: FinetuneObjective,
        val_set: EvalSet,
        data: FinetuneData,
        batch_size: int,
        fabric,
        best_path: Path,
        steps: int,
    ):
        self.objective, self.val_set, self.data = objective, val_set, data
        self.batch_size, self.fabric, self.best_path, self.steps = (
            batch_size,
            fabric,
            best_path,
            steps,
        )
        self.monitor = MONITOR[data.task]
        self.history: list[dict] = []

    def scores(self) -> dict:
        return evaluate(
            self.objective.model,
            self.val_set,
            self.data.task,
            len(self.data.classes),
            self.batch_size,
            self.fabric.device,
            self.fabric.autocast,
        )

    def __call__(self, step: int) -> bool:
        from geoexplora.io.outputs import atomic_output, torch_save

        scores = self.scores()
        score = scores[self.monitor]
        stopping = self.objective.stopping
        improved = stopping.update(score, step)
        self.history.append({"step": step, f"val_{self.monitor}": score})
        if self.fabric.is_global_zero:
            log_record({"step": step, **{f"val_{k}": v for k, v in scores.items()}})  # trackers
            if improved:
                with atomic_output(self.best_path, overwrite=True) as tmp:
                    torch_save(
                        {
                            "step": step,
                            "score": score,
                            "metrics": _jsonable(scores),
                            "state": _trainable_state(self.objective.model),
                        },
                        tmp,
                    )
        self.fabric.barrier()
        logger.info(
            "step %d: val %s %.4f%s",
            step,
            self.monitor,
            score,
            " (best)"
            if improved
            else f" (best {float(stopping.best_score):.4f} at step {int(stopping.best_step)})",
        )
        stop = stopping.exhausted and step < self.steps
        if stop:
            logger.info(
                "early stop at step %d: val %s has not improved for %d evaluations",
                step,
                self.monitor,
                stopping.patience,
            )
        return stop


@reports_progress
def finetune(cfg: FinetuneConfig) -> FinetuneResult | None:
    """Fine-tune ``cfg.model`` on ``cfg.chips``, write ``cfg.output``; the result document
    (None on the other ranks of a multi-device run)."""
    from geoexplora.io.outputs import check_not_input, check_output
    from geoexplora.memory import check_training_memory
    from geoexplora.train import engine as E
    from geoexplora.train.features import check_models, dataset_digest, model_digest

    _check_config(cfg)
    (model_path,) = check_models([cfg.model], cfg.init_weights, cfg.bands, cfg.seed)
    files = E.RunFiles(Path(cfg.output))
    check_not_input(
        [cfg.output, files.checkpoint, files.log, files.plot, _best_path(Path(cfg.output))],
        [cfg.model, cfg.chips],
    )
    output = check_output(cfg.output, cfg.overwrite)
    E.RunFiles(output).check(cfg.overwrite, cfg.resume, extra=(_best_path(output),))
    data = load_finetune_data(cfg)

    fabric = E.make_fabric(
        E.FabricSettings(cfg.accelerator, cfg.devices, cfg.num_nodes, cfg.strategy, cfg.precision)
    )
    torch.manual_seed(cfg.seed)
    objective, band_index, report, weights = build_objective(cfg, model_path, data)
    train = data.splits["train"]
    check_training_memory(
        objective,
        objective.model.backbone,
        ModelInputs(train, band_index)[data.indices["train"][0]],
        train.chip_size,
        cfg.batch_size,
        fabric,
        cfg.num_workers,
    )
    # A batch larger than the train split repeats chips in every step (and one of 100 000 chips
    # runs for hours); up to the default batch it is allowed, so small datasets take defaults.
    if cfg.batch_size > max(len(data.indices["train"]), FINETUNE.batch_size):
        raise UserError(
            f"{cfg.batch_size} is larger than the train split of {cfg.chips} "
            f"({len(data.indices['train'])} labelled chips)",
            option="batch_size",
        )
    plan = finetune_schedule(cfg, len(data.indices["train"]), fabric.world_size)
    inputs = {name: ModelInputs(ds, band_index) for name, ds in data.splits.items()}
    train_stream = TrainStream(inputs["train"], data.indices["train"], cfg.seed, cfg.augment)
    optimizer = E.build_optimizer(E.param_groups(objective), betas=FINETUNE.betas)
    schedules = E.Schedules(
        total_steps=plan.steps,
        lr=plan.lr,
        min_lr=min(cfg.min_lr, plan.lr),
        warmup_steps=plan.warmup,
        weight_decay=cfg.weight_decay,
    )
    settings = E.LoopSettings(
        output=output,
        steps=plan.steps,
        batch_size=cfg.batch_size,
        accumulate=cfg.accumulate,
        clip_grad=cfg.clip_grad,
        checkpoint_every=plan.eval_every,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        description=f"finetune {cfg.mode}",
    )
    digests = {
        "model_sha256": model_digest(model_path),
        "dataset_sha256": dataset_digest(Path(cfg.chips)),
    }
    best_path = _best_path(output)
    if not cfg.resume and fabric.is_global_zero and best_path.exists():
        best_path.unlink()  # a previous run's: this run starts afresh
    validation = Validation(
        objective,
        EvalSet(inputs["val"], data.indices["val"]),
        data,
        cfg.batch_size,
        fabric,
        best_path,
        plan.steps,
    )
    loop = E.TrainLoop(
        fabric,
        objective,
        optimizer,
        train_stream,
        settings,
        schedules,
        fingerprint=_fingerprint(cfg, data, plan, digests, fabric.world_size),
        on_checkpoint=validation,
    )
    # The untrained head's score: the baseline fine-tuning must beat (not on resume: the
    # weights are not the initial ones then).
    val_at_start = None if cfg.resume else validation.scores()
    summary = loop.run(resume=cfg.resume)

    metrics = _best_and_test(objective, validation, inputs, val_at_start)
    training = {
        "task": data.task,
        "mode": cfg.mode,
        "steps": plan.steps,
        "epochs": round(plan.epochs, 3),
        "early_stopped_at": summary["stopped_early_at"],
        "batch_size": cfg.batch_size,
        "global_batch": plan.global_batch,
        "lr": plan.lr,
        "min_lr": schedules.min_lr,
        "warmup_steps": plan.warmup,
        "weight_decay": cfg.weight_decay,
        "label_smoothing": cfg.label_smoothing,
        "drop_path": cfg.drop_path,
        "lora_rank": cfg.lora_rank if cfg.mode in ("lora", "explora") else None,
        "lora_alpha": cfg.lora_alpha if cfg.mode in ("lora", "explora") else None,
        "class_weighting": cfg.class_weighting,
        "class_weights": _named(weights.tolist(), data.classes),
        "augment": cfg.augment,
        "eval_every": plan.eval_every,
        "seed": cfg.seed,
        "parameters": report,
    }
    _save(cfg, output, objective.model, data, training, metrics, digests, model_path, fabric)
    if not fabric.is_global_zero:
        return None  # rank 0 reports
    return FinetuneResult.from_report(
        {
            "output": str(output),
            "model": str(model_path),
            "chips": str(cfg.chips),
            "task": data.task,
            "mode": cfg.mode,
            "classes": [c["name"] for c in data.classes],
            "training": training,
            "metrics": metrics,
            "evaluations": validation.history,
            "train": _jsonable(summary),
        }
    )


def _fingerprint(
    cfg: FinetuneConfig, data: FinetuneData, plan: FinetuneSchedule, digests: dict, world: int
) -> dict:
    """What a resumed run must share with the interrupted one."""
    return {
        **digests,
        "task": data.task,
        "mode": cfg.mode,
        "steps": plan.steps,
        "batch_size": cfg.batch_size,
        "accumulate": cfg.accumulate,
        "world_size": world,
        "lr": plan.lr,
        "warmup": plan.warmup,
        "weight_decay": cfg.weight_decay,
        "label_smoothing": cfg.label_smoothing,
        "drop_path": cfg.drop_path,
        "lora_rank": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "class_weighting": cfg.class_weighting,
        "augment": cfg.augment,
        "eval_every": plan.eval_every,
        "seed": cfg.seed,
        "val_from_train": cfg.val_fraction if data.val_from_train else None,
    }


def _best_and_test(
    objective: FinetuneObjective, validation: Validation, inputs: dict, val_at_start: dict | None
) -> dict:
    """Load the best checkpoint's weights into the model, score the test split with them."""
    data, fabric = validation.data, validation.fabric
    if not validation.best_path.exists():
        raise RuntimeFailure(
            f"the validation {validation.monitor} was never a number (is the "
            "val split labelled?); no best checkpoint to export"
        )
    best = torch.load(validation.best_path, map_location="cpu", weights_only=True)
    missing = objective.model.load_state_dict(best["state"], strict=False)
    if missing.unexpected_keys:
        raise RuntimeFailure(
            f"{validation.best_path}: holds unknown weights {missing.unexpected_keys[:3]}"
        )
    test_metrics = None
    if data.indices["test"]:
        test_metrics = evaluate(
            objective.model,
            EvalSet(inputs["test"], data.indices["test"]),
            data.task,
            len(data.classes),
            validation.batch_size,
            fabric.device,
            fabric.autocast,
        )
    return {
        "monitor": validation.monitor,
        "best_step": int(best["step"]),
        "val": summarise_metrics(best["metrics"], data.task, data.classes),
        "val_at_start": summarise_metrics(val_at_start, data.task, data.classes),
        "test": summarise_metrics(test_metrics, data.task, data.classes),
    }


def _save(
    cfg: FinetuneConfig,
    output: Path,
    model,
    data: FinetuneData,
    training: dict,
    metrics: dict,
    digests: dict,
    model_path: Path,
    fabric,
) -> None:
    """The task model file (rank 0), with its training, metrics and provenance."""
    from geoexplora.models.file import save_model
    from geoexplora.train.features import model_provenance

    provenance = {
        "data": {
            "chips": str(Path(cfg.chips).resolve()),
            "dataset_sha256": digests["dataset_sha256"],
            "splits": {k: len(v) for k, v in data.indices.items()},
            "val_from_train": data.val_from_train,
            "tile": data.meta.get("provenance"),
        },
        **model_provenance(model_path),
    }
    if fabric.is_global_zero:
        save_model(
            output,
            model,
            {"finetune": training, "metrics": metrics, "provenance": provenance},
            overwrite=cfg.overwrite,
        )
    fabric.barrier()


def _jsonable(obj):
    """Plain Python numbers/containers (tensors become numbers or lists)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if torch.is_tensor(obj):
        return obj.tolist()
    return obj
