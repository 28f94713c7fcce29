"""Linear probing and k-NN on frozen features (the DINOv2 evaluation protocol).

A grid of linear heads, one per (feature set, learning rate), is trained *together* on the cached
training features: every head sees the same minibatches and the heads' losses are summed (their
gradients do not interact). The head with the best validation score is chosen; only that head is
then evaluated on the test split. The fitting functions never see the test split, so test numbers
cannot leak into the choice.

k-NN: cosine similarity between L2-normalised features, the ``k`` nearest training samples vote
with weight ``exp(similarity / temperature)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from geoexplora.config_checks import path_list
from geoexplora.defaults import PROBE
from geoexplora.devices import resolve_device
from geoexplora.errors import opt
from geoexplora.log import Progress, reports_progress
from geoexplora.results import ProbeResult
from geoexplora.train import metrics as M

# The ways a chip becomes a feature vector; see :func:`compose_features`.
FEATURE_SETS = ("cls", "cls4", "cls+mean", "cls4+mean")


def compose_features(cls_blocks: torch.Tensor, patch_mean: torch.Tensor, name: str) -> torch.Tensor:
    """One feature set from the cached parts.

    ``cls_blocks`` (N, n, D): the normed cls tokens of the last n blocks, oldest first;
    ``patch_mean`` (N, D): the mean of the last block's normed patch tokens (over dates and
    patches). ``cls`` = last block's cls; ``cls4`` = the last 4 cls tokens concatenated;
    ``+mean`` appends the patch mean.
    """
    if name not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {name!r}; known: {', '.join(FEATURE_SETS)}")
    if name.startswith("cls4"):
        if cls_blocks.shape[1] < 4:
            raise ValueError(
                f"{name} needs the cls tokens of 4 blocks; {cls_blocks.shape[1]} cached"
            )
        feats = cls_blocks[:, -4:].flatten(1)
    else:
        feats = cls_blocks[:, -1]
    if name.endswith("+mean"):
        feats = torch.cat([feats, patch_mean], dim=1)
    return feats.float()


@dataclass(frozen=True)
class HeadSpec:
    """One head of the grid: which features it reads and its base learning rate (per 256)."""

    features: str
    base_lr: float

    def lr(self, batch_size: int) -> float:
        return self.base_lr * batch_size / 256


class HeadBank(nn.Module):
    """``H`` linear heads reading the same features, stored as one (H, D, K) weight so the whole
    grid costs one batched matmul per step. Initialised N(0, 0.01), zero bias (recipe)."""

    def __init__(
        self, num_heads: int, dim: int, num_classes: int, generator: torch.Generator | None = None
    ):
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(num_heads, dim, num_classes).normal_(
                0.0, PROBE.head_init_std, generator=generator
            )
        )
        self.bias = nn.Parameter(torch.zeros(num_heads, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (H, N, K) logits."""
        return torch.einsum("nd,hdk->hnk", x, self.weight) + self.bias[:, None]

    def linear(self, i: int) -> nn.Linear:
        """Head ``i`` as a plain ``nn.Linear``."""
        dim, num_classes = self.weight.shape[1:]
        head = nn.Linear(dim, num_classes)
        with torch.no_grad():
            head.weight.copy_(self.weight[i].T)
            head.bias.copy_(self.bias[i])
        return head


@dataclass
class LinearProbeFit:
    """The trained grid: every head's settings and validation score, and the chosen one."""

    specs: list[HeadSpec]
    val_scores: list[float]
    best: int
    banks: dict[str, HeadBank]
    batch_size: int
    steps: int
    multilabel: bool
    val_metric: str

    @property
    def best_spec(self) -> HeadSpec:
        return self.specs[self.best]

    def head(self, i: int) -> nn.Linear:
        """Head ``i`` of the grid (``specs[i]``) as a plain ``nn.Linear``."""
        spec = self.specs[i]
        return self.banks[spec.features].linear(
            [s for s in self.specs if s.features == spec.features].index(spec)
        )

    def logits(self, features: dict[str, torch.Tensor], i: int | None = None) -> torch.Tensor:
        """Logits of head ``i`` (default: the chosen head), given feature sets by name."""
        i = self.best if i is None else i
        with torch.no_grad():
            return self.head(i)(features[self.specs[i].features].float())


def val_score(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> float:
    """The selection metric: top-1 (single-label) or mAP (multi-label)."""
    if multilabel:
        return M.multilabel_metrics(logits, targets)["map"]
    return float((logits.argmax(1) == targets).double().mean())


def _grid_loss(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Sum over heads of each head's mean loss; ``logits`` (H, N, K)."""
    heads, n, k = logits.shape
    if multilabel:
        total = nn.functional.binary_cross_entropy_with_logits(
            logits, targets.float().expand(heads, n, k), reduction="sum"
        )
        return total / (n * k)
    return (
        nn.functional.cross_entropy(
            logits.reshape(heads * n, k), targets.repeat(heads), reduction="sum"
        )
        / n
    )


def train_linear_heads(
    train: dict[str, torch.Tensor],
    train_targets: torch.Tensor,
    val: dict[str, torch.Tensor],
    val_targets: torch.Tensor,
    num_classes: int,
    base_lrs: tuple[float, ...],
    multilabel: bool = False,
    steps: int = 1000,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> LinearProbeFit:
    """Train one linear head per (feature set in ``train``, base lr) and choose on ``val``.

    ``train``/``val`` map a feature-set name to (N, D) features; targets are class ids (N,) or,
    with ``multilabel``, multi-hot (N, K) floats (per-class sigmoid). SGD momentum 0.9, no weight
    decay, cosine schedule over ``steps``, lr = base_lr x batch/256, heads initialised
    N(0, 0.01) with zero bias. Ties on validation go to the first head (feature sets in the order
    given, lower learning rate first).
    """
    if not train:
        raise ValueError("no feature sets to probe")
    n = train_targets.shape[0]
    batch_size = min(batch_size, n)
    generator = torch.Generator().manual_seed(seed)
    names = list(train)
    banks = nn.ModuleDict(
        {
            name: HeadBank(len(base_lrs), train[name].shape[1], num_classes, generator)
            for name in names
        }
    ).to(device)
    # Per-head learning rates: one SGD over all banks at lr batch/256, each head's gradient scaled
    # by its base lr. With momentum and no weight decay, scaling a head's gradient by a constant
    # is exactly scaling its learning rate.
    head_lr = torch.tensor(base_lrs, dtype=torch.float32, device=device)
    optimiser = torch.optim.SGD(
        banks.parameters(), lr=batch_size / 256, momentum=PROBE.momentum, weight_decay=0.0
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    train_dev = {name: train[name].float().to(device) for name in names}
    y_dev = train_targets.to(device)
    order, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=generator), 0
        idx = order[pos : pos + batch_size].to(device)
        pos += batch_size
        loss = sum(
            _grid_loss(banks[name](train_dev[name][idx]), y_dev[idx], multilabel) for name in names
        )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        for bank in banks.values():
            bank.weight.grad.mul_(head_lr.view(-1, 1, 1))
            bank.bias.grad.mul_(head_lr.view(-1, 1))
        optimiser.step()
        schedule.step()

    specs, scores = [], []
    with torch.no_grad():
        for name in names:
            logits = banks[name](val[name].float().to(device)).cpu()
            for h, lr in enumerate(base_lrs):
                score = val_score(logits[h], val_targets, multilabel)
                specs.append(HeadSpec(name, lr))
                scores.append(score if math.isfinite(score) else -math.inf)
    best = max(range(len(specs)), key=lambda i: scores[i])
    return LinearProbeFit(
        specs,
        scores,
        best,
        {k: b.cpu() for k, b in banks.items()},
        batch_size,
        steps,
        multilabel,
        "map" if multilabel else "top1",
    )


def knn_scores(
    bank: torch.Tensor,
    bank_targets: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN class votes (Q, K), each row summing to 1.

    ``bank_targets`` are class ids (N,) or multi-hot (N, K); for multi-hot targets a row is the
    weighted share of neighbours carrying each label.
    """
    if bank.shape[0] == 0:
        raise ValueError("the k-NN bank is empty")
    k = min(k, bank.shape[0])
    bank = nn.functional.normalize(bank.float(), dim=1)
    queries = nn.functional.normalize(queries.float(), dim=1)
    if bank_targets.ndim == 1:
        onehot = nn.functional.one_hot(bank_targets.long(), num_classes).float()
    else:
        onehot = bank_targets.float()
    out = [torch.zeros(0, num_classes)]
    for start in range(0, queries.shape[0], chunk):
        sim, idx = (queries[start : start + chunk] @ bank.T).topk(k, dim=1)
        weight = (sim / temperature).exp()
        votes = (weight.unsqueeze(2) * onehot[idx]).sum(1)
        out.append(votes / weight.sum(1, keepdim=True))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# The probe run: models x one chips dataset
# ---------------------------------------------------------------------------------------------


@dataclass
class ProbeConfig:
    """``geoexplora probe MODEL... CHIPS``; defaults in ``geoexplora.defaults.PROBE``."""

    models: list[Path]  # model files, or specs (a registry/timm name, torchgeo:ENUM)
    chips: Path
    init_weights: str | None = None  # for models given by name: a checkpoint, or "random"
    bands: list[str] | None = None  # for models given by name: chips' bands to build on
    features: tuple[str, ...] = PROBE.features
    learning_rates: tuple[float, ...] = PROBE.learning_rates
    steps: int = PROBE.steps
    batch_size: int = PROBE.batch_size
    knn_k: int = PROBE.knn_k
    knn_temperature: float = PROBE.knn_temperature
    extract_batch_size: int = PROBE.extract_batch_size
    val_fraction: float = PROBE.val_fraction
    cache_dir: Path | None = None  # None: no feature cache (the CLI passes the default folder)
    plots_dir: Path | None = None
    save_head: Path | None = None
    overwrite: bool = False
    device: str | None = None
    num_workers: int = 0
    seed: int = 0
    progress: Progress = True  # False, or a callback (see geoexplora.log)

    def __post_init__(self):
        self.models = path_list("models", self.models)


def _check_config(cfg: ProbeConfig) -> None:
    from geoexplora.errors import UserError

    if not cfg.models:
        raise UserError("probe needs at least one MODEL file before the CHIPS folder")
    unknown = [f for f in cfg.features if f not in FEATURE_SETS]
    if unknown or not cfg.features:
        raise UserError(
            f"{opt('features')} {','.join(cfg.features)}: use any of {', '.join(FEATURE_SETS)}"
        )
    if not cfg.learning_rates or any(not lr > 0 for lr in cfg.learning_rates):
        raise UserError(f"{opt('learning_rates')} must be positive numbers")
    for name, value in (
        ("--steps", cfg.steps),
        ("--batch-size", cfg.batch_size),
        ("--knn-k", cfg.knn_k),
        ("--extract-batch-size", cfg.extract_batch_size),
    ):
        if value < 1:
            raise UserError(f"{name} must be at least 1, not {value}")
    if not cfg.knn_temperature > 0:
        raise UserError(f"--knn-temperature must be positive, not {cfg.knn_temperature}")
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"{opt('val_fraction')} must lie in (0, 1), not {cfg.val_fraction}")
    if cfg.save_head is not None and len(cfg.models) != 1:
        raise UserError(f"{opt('save_head')} takes one MODEL (the head is trained on its features)")


@dataclass
class _Labelled:
    """One split's labelled chips: targets and the cached parts of their features."""

    feats: object  # features.SplitFeatures
    targets: torch.Tensor

    def sets(self, names) -> dict[str, torch.Tensor]:
        return {n: compose_features(self.feats.cls_blocks, self.feats.patch_mean, n) for n in names}


def _labelled(feats, multilabel: bool) -> _Labelled:
    """Keep the chips that carry a label (class id >= 0; at least one label when multilabel)."""
    if multilabel:
        keep = (feats.labels.sum(1) > 0).nonzero().squeeze(1)
        sub = feats.subset(keep)
        return _Labelled(sub, sub.labels.float())
    keep = (feats.label >= 0).nonzero().squeeze(1)
    sub = feats.subset(keep)
    return _Labelled(sub, sub.label.long())


def stratified_holdout(
    targets: torch.Tensor, fraction: float, seed: int, multilabel: bool
) -> torch.Tensor:
    """Boolean mask of the chips held out for validation: ``fraction`` of each class (at least
    one where the class has two or more chips). Multilabel: a plain random ``fraction``."""
    g = torch.Generator().manual_seed(seed)
    n = targets.shape[0]
    held = torch.zeros(n, dtype=torch.bool)
    if multilabel:
        order = torch.randperm(n, generator=g)
        held[order[: max(1, round(fraction * n))]] = True
        return held
    for c in targets.unique().tolist():
        idx = (targets == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        take = round(fraction * len(idx)) if len(idx) > 1 else 0
        held[idx[: max(take, 1 if len(idx) > 1 else 0)]] = True
    return held


def _evaluate(
    logits: torch.Tensor, targets: torch.Tensor, num_classes: int, multilabel: bool
) -> dict:
    if multilabel:
        return M.multilabel_metrics(logits, targets)
    cm = M.confusion_matrix(logits.argmax(1), targets, num_classes)
    return {**M.classification_metrics(cm), "confusion_matrix": cm.tolist()}


def _knn_logits(votes: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """k-NN votes as scores the metrics take: shares as logits for multilabel (so a share of
    1/2 sits at the 0.5 threshold), the votes themselves otherwise (argmax)."""
    return torch.logit(votes, eps=1e-6) if multilabel else votes


@reports_progress
def probe(cfg: ProbeConfig) -> ProbeResult:
    """Probe every model of ``cfg.models`` on ``cfg.chips``; ``report`` is the result document
    (``--json``).

    Raises UserError on bad input before any work is written.
    """
    from geoexplora.errors import UserError
    from geoexplora.io.chips import ChipsDataset, load_dataset_meta
    from geoexplora.io.outputs import check_not_input, check_output
    from geoexplora.log import logger
    from geoexplora.train.features import cached_features, check_models

    _check_config(cfg)
    models = check_models(cfg.models, cfg.init_weights, cfg.bands, cfg.seed)
    meta = load_dataset_meta(cfg.chips)
    multilabel = meta["task"] == "multilabel"
    classes = meta.get("classes") or []
    if len(classes) < 2:
        raise UserError(
            f"{cfg.chips}: probing needs a labelled chips dataset with at least two "
            f"classes (task '{meta['task']}', {len(classes)} classes); tile with "
            f"{opt('labels')}"
        )
    if cfg.save_head is not None:
        check_not_input([cfg.save_head], [*cfg.models, cfg.chips], "save_head")
        check_output(cfg.save_head, cfg.overwrite, "save_head")
    plot_paths = {}
    if cfg.plots_dir is not None:
        plot_paths = {
            m: Path(cfg.plots_dir) / f"{_model_label(m, models)}.confusion.png" for m in models
        }
        if not multilabel:
            check_not_input(plot_paths.values(), [*cfg.models, cfg.chips], "plots")
            for path in plot_paths.values():
                check_output(path, cfg.overwrite, "plots")
    device = resolve_device(cfg.device)
    splits = {name: ChipsDataset(cfg.chips, split=name) for name in ("train", "val", "test")}
    splits = {name: ds for name, ds in splits.items() if len(ds)}
    if "train" not in splits:
        raise UserError(f"{cfg.chips}: no chips in the train split")
    num_classes = len(classes)
    notes: list[str] = []
    results = []
    selection = None
    for model_path in models:
        feats, from_cache = cached_features(
            model_path, splits, cfg.cache_dir, cfg.extract_batch_size, device, cfg.num_workers
        )
        data = {name: _labelled(f, multilabel) for name, f in feats.items()}
        if len(data["train"].targets) < 2:
            raise UserError(
                f"{cfg.chips}: the train split has {len(data['train'].targets)} "
                "labelled chips; probing needs more"
            )
        train, val = data["train"], data.get("val")
        if val is None or len(val.targets) == 0:
            held = stratified_holdout(train.targets, cfg.val_fraction, cfg.seed, multilabel)
            val = _Labelled(train.feats.subset(held.nonzero().squeeze(1)), train.targets[held])
            train = _Labelled(
                train.feats.subset((~held).nonzero().squeeze(1)), train.targets[~held]
            )
            selection = "val_from_train"
        test = data.get("test")
        evaluated_on = "test"
        if test is None or len(test.targets) == 0:
            test, evaluated_on = val, "val"
        fit = train_linear_heads(
            train.sets(cfg.features),
            train.targets,
            val.sets(cfg.features),
            val.targets,
            num_classes,
            tuple(cfg.learning_rates),
            multilabel,
            cfg.steps,
            cfg.batch_size,
            cfg.seed,
            device,
        )
        linear = _evaluate(
            fit.logits(test.sets([fit.best_spec.features])), test.targets, num_classes, multilabel
        )
        votes = knn_scores(
            train.sets(["cls"])["cls"],
            train.targets,
            test.sets(["cls"])["cls"],
            num_classes,
            cfg.knn_k,
            cfg.knn_temperature,
        )
        knn = _evaluate(_knn_logits(votes, multilabel), test.targets, num_classes, multilabel)
        result = _model_result(
            model_path,
            models,
            fit,
            linear,
            knn,
            from_cache,
            multilabel,
            classes,
            {
                "train": len(train.targets),
                "val": len(val.targets),
                "test": len(test.targets) if evaluated_on == "test" else 0,
            },
        )
        if cfg.save_head is not None:
            keys = ("top1", "balanced_accuracy", "macro_f1") + (("map",) if multilabel else ())
            result["saved_head"] = _save_head(
                cfg,
                model_path,
                fit,
                fit.best,
                splits,
                meta,
                multilabel,
                {"evaluated_on": evaluated_on, **{k: linear[k] for k in keys}},
            )
        if model_path in plot_paths and not multilabel:
            _plot_confusion(
                linear["confusion_matrix"],
                [c["name"] for c in classes],
                plot_paths[model_path],
                f"{model_path.name}: linear probe ({evaluated_on})",
            )
            result["plot"] = str(plot_paths[model_path])
        results.append(result)
    if selection == "val_from_train":
        notes.append(
            f"no val split: {cfg.val_fraction:.0%} of the train split (stratified) chose the head"
        )
    if evaluated_on == "val":
        notes.append(
            "no test split: metrics are on the val split, which also chose the head (optimistic)"
        )
    for note in notes:
        logger.warning(note)
    _track(results)
    return ProbeResult.from_report(
        {
            "chips": str(cfg.chips),
            "task": "multilabel" if multilabel else "classification",
            "classes": [c["name"] for c in classes],
            "evaluated_on": evaluated_on,
            "notes": notes,
            "protocol": {
                "features": list(cfg.features),
                "learning_rates": list(cfg.learning_rates),
                "steps": cfg.steps,
                "batch_size": cfg.batch_size,
                "optimizer": "sgd",
                "momentum": PROBE.momentum,
                "weight_decay": 0.0,
                "schedule": "cosine",
                "head_init_std": PROBE.head_init_std,
                "selection": f"best val {'mAP' if multilabel else 'top-1'}",
                "knn": {
                    "k": cfg.knn_k,
                    "temperature": cfg.knn_temperature,
                    "features": "cls",
                    "similarity": "cosine",
                },
                "seed": cfg.seed,
            },
            "models": results,
        }
    )


# The scores a tracker gets of each probed model (``--logger``): probe's table.
TRACKED_SCORES = (
    "top1",
    "balanced_accuracy",
    "macro_f1",
    "map",
    "knn_top1",
    "knn_balanced_accuracy",
    "knn_macro_f1",
    "knn_map",
)


def _track(results: list[dict]) -> None:
    """The scores table and the confusion PNGs to the experiment trackers open around the run."""
    from geoexplora.train.tracking import log_images, log_table

    log_table(
        "probe",
        [{"model": r["name"], **{k: r[k] for k in TRACKED_SCORES if k in r}} for r in results],
    )
    log_images([Path(r["plot"]) for r in results if "plot" in r])


def _model_label(path, models: list) -> str:
    """The model's file stem (its spec for a model given by name), or its path when two models
    share a stem."""
    stems = [m.stem for m in models]
    return path.stem if stems.count(path.stem) == 1 else str(path).replace("/", "_")


def _per_class(values: list[float], classes: list[dict]) -> dict[str, float]:
    return {c["name"]: v for c, v in zip(classes, values)}


def _model_result(
    path,
    models: list,
    fit: LinearProbeFit,
    linear: dict,
    knn: dict,
    from_cache: bool,
    multilabel: bool,
    classes: list[dict],
    sizes: dict,
) -> dict:
    spec = fit.best_spec
    out = {
        "model": str(path),
        "name": _model_label(path, models),
        "top1": linear["top1"],
        "balanced_accuracy": linear["balanced_accuracy"],
        "macro_f1": linear["macro_f1"],
        "knn_top1": knn["top1"],
        "knn_balanced_accuracy": knn["balanced_accuracy"],
        "knn_macro_f1": knn["macro_f1"],
        "per_class_f1": _per_class(linear["per_class_f1"], classes),
        "split_sizes": sizes,
        "features_from_cache": from_cache,
        "chosen_head": {
            "features": spec.features,
            "base_lr": spec.base_lr,
            "lr": spec.lr(fit.batch_size),
            "batch_size": fit.batch_size,
            "steps": fit.steps,
            f"val_{fit.val_metric}": fit.val_scores[fit.best],
        },
        "grid": [
            {"features": s.features, "base_lr": s.base_lr, f"val_{fit.val_metric}": v}
            for s, v in zip(fit.specs, fit.val_scores)
        ],
        "linear": linear,
        "knn": knn,
    }
    if multilabel:
        out.update(
            map=linear["map"],
            micro_f1=linear["micro_f1"],
            knn_map=knn["map"],
            per_class_ap=_per_class(linear["per_class_ap"], classes),
        )
    else:
        out["confusion_matrix"] = linear["confusion_matrix"]
    return out


def _plot_confusion(cm: list[list[int]], names: list[str], path: Path, title: str) -> None:
    """A row-normalised confusion matrix PNG (counts written in the cells)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from geoexplora.io.outputs import atomic_output

    counts = torch.tensor(cm, dtype=torch.float64)
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    k = len(names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * k, 1.0 + 0.6 * k), dpi=100)
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                str(int(counts[i, j])),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if rates[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _save_head(
    cfg: ProbeConfig,
    model_path,
    fit: LinearProbeFit,
    i: int,
    splits: dict,
    meta: dict,
    multilabel: bool,
    metrics: dict,
) -> dict:
    """Write the backbone + head ``i`` of the grid + classes as a task model file."""
    from geoexplora.models.file import save_model
    from geoexplora.models.heads import CLS_BLOCKS, LinearHead, TaskModel
    from geoexplora.train.features import backbone_for_dataset, dataset_digest, model_provenance

    spec = fit.specs[i]
    trained = fit.head(i)
    backbone, _ = backbone_for_dataset(model_path, splits["train"])
    head = LinearHead(
        backbone.embed_dim,
        trained.out_features,
        pooling=spec.features,
        cls_blocks=min(CLS_BLOCKS, backbone.depth),
    )
    head.fc.load_state_dict(trained.state_dict())
    task = "multilabel" if multilabel else "classification"
    model = TaskModel(backbone, head, task, meta["classes"])
    chosen = {
        "features": spec.features,
        "base_lr": spec.base_lr,
        "lr": spec.lr(fit.batch_size),
        "batch_size": fit.batch_size,
        "steps": fit.steps,
        f"val_{fit.val_metric}": fit.val_scores[i],
    }
    save_model(
        cfg.save_head,
        model,
        {
            "probe": chosen,
            "metrics": metrics,
            "provenance": {
                "data": {
                    "chips": str(Path(cfg.chips).resolve()),
                    "dataset_sha256": dataset_digest(Path(cfg.chips)),
                    "tile": meta.get("provenance"),
                },
                **model_provenance(model_path),
            },
        },
        overwrite=cfg.overwrite,
    )
    return {"path": str(cfg.save_head), **chosen}
