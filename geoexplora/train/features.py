"""Frozen-backbone features of a chips dataset, extracted once and cached on disk.

What is cached per chip: the normed cls tokens of the last (up to) 4 blocks and the mean of the
last block's normed patch tokens (over dates and patches). Every probe feature set
(``geoexplora.pipelines.probe.FEATURE_SETS``) is composed from these two, so one extraction serves
them all.

The cache key is the SHA-256 of the model file, the dataset's ``dataset.json`` and
``index.parquet``, the split and the extraction version: a re-tiled dataset or a re-trained model
gets new features, the same pair is never extracted twice. Cache files are plain tensors and
strings, loaded with ``torch.load(weights_only=True)``, written atomically.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from geoexplora.errors import UserError, opt
from geoexplora.io.chips import INDEX_NAME, META_NAME, ChipsDataset
from geoexplora.io.outputs import atomic_output, torch_save
from geoexplora.log import logger, make_progress
from geoexplora.models.heads import CLS_BLOCKS
from geoexplora.provenance import sha256_file

EXTRACTION_VERSION = 1


def dataset_digest(root: Path) -> str:
    """Identity of a chips dataset: its metadata and index (``tile`` rewrites both)."""
    digest = hashlib.sha256()
    for name in (META_NAME, INDEX_NAME):
        digest.update(sha256_file(root / name).encode())
    return digest.hexdigest()


def cache_key(model_sha: str, dataset_sha: str, split: str) -> str:
    text = f"v{EXTRACTION_VERSION}:{model_sha}:{dataset_sha}:{split}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class SplitFeatures:
    """One split's frozen features and targets, in dataset order."""

    cls_blocks: torch.Tensor  # (N, n, D) float32, oldest block first
    patch_mean: torch.Tensor  # (N, D) float32
    label: torch.Tensor  # (N,) int64, -1 = none
    labels: torch.Tensor | None  # (N, K) float32 multi-hot (multilabel datasets)
    chip_ids: list[str]

    def __len__(self) -> int:
        return len(self.chip_ids)

    def to_dict(self) -> dict:
        d = {
            "cls_blocks": self.cls_blocks,
            "patch_mean": self.patch_mean,
            "label": self.label,
            "chip_ids": list(self.chip_ids),
            "version": EXTRACTION_VERSION,
        }
        if self.labels is not None:
            d["labels"] = self.labels
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SplitFeatures:
        return cls(
            d["cls_blocks"], d["patch_mean"], d["label"], d.get("labels"), list(d["chip_ids"])
        )

    def subset(self, index: torch.Tensor) -> SplitFeatures:
        return SplitFeatures(
            self.cls_blocks[index],
            self.patch_mean[index],
            self.label[index],
            None if self.labels is None else self.labels[index],
            [self.chip_ids[i] for i in index.tolist()],
        )


def frame_dates(dataset: ChipsDataset, i: int) -> torch.Tensor:
    """``(T,)`` float days since 1970-01-01 of chip ``i``'s frames (NaN unknown)."""
    from geoexplora.models.temporal import days_since_epoch

    return torch.tensor(days_since_epoch(dataset.dates(i)), dtype=torch.float32)


class ModelInputs(torch.utils.data.Dataset):
    """A chips dataset as a model sees it: items also carry ``dates`` (days since epoch, for the
    backbone's date encoding), and ``band_index`` (when given) picks the model's bands, in the
    model's order, out of the chips' bands."""

    def __init__(self, dataset: ChipsDataset, band_index: list[int] | None = None):
        self.dataset = dataset
        self.band_index = band_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        if self.band_index is not None:
            item["image"] = item["image"][:, self.band_index]
        item["dates"] = frame_dates(self.dataset, i)
        return item


def check_model_file(path: Path) -> Path:
    from geoexplora.pipelines.info import is_model_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    if not is_model_file(path):
        raise UserError(f"{path}: not a geoexplora model file (.pt written by adapt/finetune)")
    return path


@dataclass(frozen=True)
class SourceSpec:
    """A model named by a spec that is not a model file - a registry or timm name (weights: its
    published ones, ``init_weights`` PATH or ``"random"``), ``torchgeo:ENUM`` - built on a chips
    dataset's bands (``bands``: some of them, in this order) with the dataset's statistics, as
    ``adapt`` builds its source. ``seed`` makes a random initialisation reproducible (the
    feature cache and a saved head then see the same weights)."""

    spec: str
    init_weights: str | None = None
    bands: tuple[str, ...] | None = None
    seed: int = 0

    @property
    def name(self) -> str:
        return self.spec

    stem = name

    def __str__(self) -> str:
        return self.spec


def check_model(model, init_weights: str | None = None, bands=None, seed: int = 0):
    """A verb's MODEL: a geoexplora model file (its Path), or a :class:`SourceSpec` for any other
    spec (checked now: the name exists, the weights file exists, the combination makes sense).
    ``init_weights`` and ``bands`` apply to specs only."""
    from geoexplora.models.registry import resolve_init

    text = str(model)
    path = Path(text).expanduser()
    if path.is_file() or path.suffix.lower() in (".pt", ".pth"):
        path = check_model_file(path)
        from geoexplora.models.file import read_model_meta

        try:
            read_model_meta(path)
        except UserError as exc:
            if "not a geoexplora model file" in str(exc):
                raise UserError(
                    f"{path}: not a geoexplora model file; for a raw checkpoint name "
                    f"its architecture as the model and give the file as "
                    f"{opt('init_weights')} (e.g. vit_small_patch14_dinov2 "
                    f"{opt('init_weights')} {path})"
                ) from exc
            raise
        return path
    resolve_init(text, init_weights)
    return SourceSpec(text, init_weights, tuple(bands) if bands else None, seed)


def check_models(models, init_weights: str | None = None, bands=None, seed: int = 0) -> list:
    """:func:`check_model` of each; ``init_weights``/``bands`` must apply to one of them."""
    out = [check_model(m, init_weights, bands, seed) for m in models]
    if not any(isinstance(m, SourceSpec) for m in out):
        for name, value in (("init_weights", init_weights), ("bands", bands)):
            if value:
                raise UserError(
                    "applies to a model given by name (a registry or timm name, "
                    "torchgeo:ENUM), not to model files, which carry their own",
                    option=name,
                )
    return out


def model_digest(model) -> str:
    """Identity of a model: the file's sha256; for a spec, of what builds it (name, weights
    file's sha256, bands, seed, and for random weights the versions that draw them)."""
    if not isinstance(model, SourceSpec):
        return sha256_file(model)
    import json

    return hashlib.sha256(json.dumps(source_provenance(model), sort_keys=True).encode()).hexdigest()


def source_provenance(spec: SourceSpec) -> dict:
    import importlib.metadata

    doc: dict = {
        "spec": spec.spec,
        "init_weights": spec.init_weights,
        "bands": list(spec.bands) if spec.bands else None,
    }
    weights = (spec.init_weights or "").strip()
    if weights.lower() == "random":
        doc["seed"] = spec.seed
        doc["versions"] = {p: importlib.metadata.version(p) for p in ("torch", "timm")}
    elif weights:
        doc["init_weights_sha256"] = sha256_file(Path(weights).expanduser())
    return doc


def model_provenance(model) -> dict:
    """What a written model records of the model it started from."""
    if isinstance(model, SourceSpec):
        return {"backbone_source": source_provenance(model)}
    return {"backbone_file": {"path": str(Path(model).resolve()), "sha256": sha256_file(model)}}


def _source_for_dataset(spec: SourceSpec, dataset: ChipsDataset):
    from geoexplora.bands import check_distinct, find_band
    from geoexplora.models import build_backbone

    index = list(range(len(dataset.bands)))
    if spec.bands:
        index = []
        for token in spec.bands:
            match = [i for i, b in enumerate(dataset.bands) if find_band(b.sensor, token) == b]
            if not match:
                have = ", ".join(b.name for b in dataset.bands)
                raise UserError(
                    f"{token}: not in the chips dataset {dataset.root} (has: {have})",
                    option="bands",
                )
            index.append(match[0])
        check_distinct(list(spec.bands), [dataset.bands[i] for i in index])
    bands = [dataset.bands[i] for i in index]
    stats = {k: [dataset.stats[k][i] for i in index] for k in ("mean", "std")}
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        vit = build_backbone(
            init=spec.spec,
            init_weights=spec.init_weights,
            bands=bands,
            stats=stats,
            img_size=dataset.chip_size,
            num_frames=dataset.num_frames,
        )
    if dataset.chip_size % vit.patch_size:
        raise UserError(
            f"{dataset.root}: {dataset.chip_size} px chips are not a multiple of "
            f"{spec.spec}'s {vit.patch_size} px patches; tile with {opt('size')} "
            f"{vit.patch_size * max(1, round(dataset.chip_size / vit.patch_size))}"
        )
    return vit, (None if index == list(range(len(dataset.bands))) else index)


def backbone_for_dataset(model_path, dataset: ChipsDataset):
    """The backbone of a model file (or a :class:`SourceSpec`, built on the chips' bands), ready
    for ``dataset``'s chips: ``(GeoViT, band_index)``.

    When the model's bands are among the chips' bands they are picked exactly (``band_index``);
    otherwise the backbone is re-targeted to the chips' bands (its band-aware embedding re-mixed,
    with a warning). A different number of dates adds or drops the date encoding.
    """
    from geoexplora.models import build_backbone

    if isinstance(model_path, SourceSpec):
        return _source_for_dataset(model_path, dataset)
    vit = build_backbone(init=str(model_path))
    if dataset.chip_size % vit.patch_size:
        raise UserError(
            f"{dataset.root}: {dataset.chip_size} px chips are not a multiple of "
            f"{model_path.name}'s {vit.patch_size} px patches; tile with {opt('size')} "
            f"{vit.patch_size * max(1, round(dataset.chip_size / vit.patch_size))}"
        )
    model_keys = [b.key for b in vit.bands]
    data_keys = [b.key for b in dataset.bands]
    band_index = None
    retarget = False
    if model_keys != data_keys:
        if set(model_keys) <= set(data_keys):
            band_index = [data_keys.index(k) for k in model_keys]
        else:
            retarget = True
            logger.warning(
                "%s was trained on bands %s; re-targeting its band-aware embedding to "
                "the chips' bands %s",
                model_path.name,
                ",".join(model_keys),
                ",".join(data_keys),
            )
    if retarget or vit.num_frames != dataset.num_frames:
        stats = {"mean": dataset.stats["mean"], "std": dataset.stats["std"]} if retarget else None
        vit = build_backbone(
            init=str(model_path),
            bands=dataset.bands if retarget else None,
            stats=stats,
            num_frames=dataset.num_frames,
        )
    return vit, band_index


def valid_frames(images: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` True where a frame has at least one finite value."""
    return torch.isfinite(images).flatten(2).any(dim=2)


@torch.no_grad()
def extract_features(
    backbone,
    dataset: ChipsDataset,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    description: str = "features",
    band_index: list[int] | None = None,
) -> SplitFeatures:
    """Run the frozen ``backbone`` (a GeoViT) over ``dataset``; memory bounded by the batch."""
    from torch.utils.data import DataLoader

    from geoexplora.memory import check_extraction_memory

    inputs = ModelInputs(dataset, band_index)
    if len(inputs):
        check_extraction_memory(
            backbone,
            inputs[0],
            dataset.chip_size,
            min(batch_size, len(inputs)),
            torch.device(device),
            num_workers,
        )
    backbone.eval().to(device)
    n_blocks = min(CLS_BLOCKS, backbone.depth)
    loader = DataLoader(inputs, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    cls_parts, mean_parts, label_parts, labels_parts, ids = [], [], [], [], []
    with make_progress(transient=True) as progress:
        task = progress.add_task(description, total=len(dataset), info="")
        for batch in loader:
            x = batch["image"].to(device)
            dates = batch["dates"].to(device) if backbone.num_frames > 1 else None
            frames = valid_frames(x)
            features = backbone.forward_features(
                x, dates=dates, frame_mask=frames, cls_blocks=n_blocks
            )
            cls, patch = features["cls_blocks"], features["patch"]
            # Mean over the valid frames' patches only.
            weight = frames.to(patch.dtype)[:, :, None, None]
            count = weight.sum((1, 2)).clamp(min=1) * patch.shape[2]
            patch_mean = (patch * weight).sum((1, 2)) / count
            cls_parts.append(cls.reshape(x.shape[0], n_blocks, -1).float().cpu())
            mean_parts.append(patch_mean.float().cpu())
            label_parts.append(batch["label"])
            if "labels" in batch:
                labels_parts.append(batch["labels"])
            ids.extend(batch["chip_id"])
            progress.advance(task, x.shape[0])
    dim = backbone.embed_dim
    return SplitFeatures(
        torch.cat(cls_parts) if cls_parts else torch.zeros(0, n_blocks, dim),
        torch.cat(mean_parts) if mean_parts else torch.zeros(0, dim),
        torch.cat(label_parts) if label_parts else torch.zeros(0, dtype=torch.int64),
        torch.cat(labels_parts) if labels_parts else None,
        ids,
    )


def cached_features(
    model_path,
    splits: dict[str, ChipsDataset],
    cache_dir: Path | None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> tuple[dict[str, SplitFeatures], bool]:
    """The features of every split in ``splits`` (name -> dataset of that split) under the model
    file ``model_path``: from the cache when present, else extracted (the backbone is loaded
    once) and stored. Returns (features per split, whether all came from the cache).
    ``cache_dir`` None: no cache."""
    paths: dict[str, Path | None] = dict.fromkeys(splits)
    if cache_dir is not None:
        model_sha = model_digest(model_path)
        dataset_sha = dataset_digest(next(iter(splits.values())).root)
        paths = {
            name: Path(cache_dir) / f"{cache_key(model_sha, dataset_sha, name)}.pt"
            for name in splits
        }
    out: dict[str, SplitFeatures] = {}
    loaded = None
    for name, dataset in splits.items():
        path = paths[name]
        if path is not None and path.is_file():
            out[name] = _read_cache(path, len(dataset))
            logger.debug("features of %s (%s) from cache %s", model_path.name, name, path)
            continue
        if loaded is None:
            loaded = backbone_for_dataset(model_path, dataset)
        backbone, band_index = loaded
        out[name] = extract_features(
            backbone,
            dataset,
            batch_size,
            device,
            num_workers,
            f"{model_path.name} {name}",
            band_index,
        )
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(path, overwrite=True) as tmp:
                torch_save(out[name].to_dict(), tmp)
    return out, loaded is None


def _read_cache(path: Path, expected: int) -> SplitFeatures:
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError) as exc:
        raise UserError(f"feature cache {path} is unreadable ({exc}); delete it") from exc
    feats = SplitFeatures.from_dict(cached)
    if len(feats) != expected:
        raise UserError(
            f"feature cache {path} has {len(feats)} chips for {expected} in the dataset; delete it"
        )
    return feats
