"""``tile --append``: add chips of new scenes (or patches) to an existing chips dataset.

The existing dataset decides what the new chips must be: its bands, frames, chip size, task, CRS
and split blocks are the defaults, and anything given that contradicts them is refused. What it
guarantees:

- Chips already in the dataset are kept as they are (their files, ids, classes and splits). A
  scene or patch whose files are already sources of the dataset is skipped.
- Classes are matched by name: known ones keep their ids and colours, new ones get the next ids
  (masks and labels of the new chips are remapped).
- Splits stay spatially blocked across runs: a new chip in a split block that holds old chips
  joins their split, and a new chip overlapping an old chip of another split is dropped
  (``split_buffer``).
- Statistics are recomputed from the pixel sample stored with the dataset
  (``stats_sample.npy``), thinned to the old chips' share, plus a sample of the new chips: the
  same statistics a single run over all chips would estimate, without re-reading old chips.
- The dataset is rebuilt next to the old one (old chips hard-linked, not copied) and swapped in
  when complete, so an interrupted append leaves the old dataset untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geoexplora.errors import UserError, opt
from geoexplora.io import chips as C

log = logging.getLogger("geoexplora")

SCENE_ID = re.compile(r"^s(\d+)_")
# TileConfig fields taken from the dataset's first run when not given (``None``): how pixels are
# read, gridded, filtered, labelled and split.
CARRIED_OVER = (
    "sensor",
    "band_map",
    "nodata",
    "resolution",
    "stride",
    "max_nodata",
    "min_label_fraction",
    "val_fraction",
    "test_fraction",
)


@dataclass
class ExistingDataset:
    """A chips dataset ``tile --append`` adds to."""

    root: Path
    meta: dict
    index: object  # GeoDataFrame
    sample: np.ndarray  # (N, C) pixels behind meta["stats"]

    @classmethod
    def load(cls, root: Path) -> ExistingDataset:
        if not (root / C.META_NAME).is_file():
            raise UserError(
                f"{opt('append')}: {root} is not a chips dataset (no {C.META_NAME}); "
                f"pass another -o, or {opt('overwrite')} to replace it"
            )
        meta = C.load_dataset_meta(root)
        index = C.read_index(root)
        sample_path = root / C.STATS_SAMPLE_NAME
        if not sample_path.is_file():
            raise UserError(
                f"{root}: no {C.STATS_SAMPLE_NAME}, so its statistics cannot be "
                "updated (written by an older geoexplora?); re-run tile with "
                f"{opt('overwrite')} instead of {opt('append')}"
            )
        try:
            sample = np.load(sample_path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise UserError(f"{sample_path}: not a readable pixel sample ({exc})") from exc
        if sample.ndim != 2 or sample.shape[1] != len(meta["bands"]):
            raise UserError(
                f"{sample_path}: shape {sample.shape} does not fit the dataset's "
                f"{len(meta['bands'])} bands"
            )
        return cls(root, meta, index, sample)

    # ------------------------------------------------------------------ what the dataset fixes

    @property
    def band_keys(self) -> list[str]:
        return [b["key"] for b in self.meta["bands"]]

    @property
    def config(self) -> dict:
        """The TileConfig of the dataset's first run, as stored in its provenance."""
        return self.meta["provenance"].get("config", {})

    @property
    def class_folders(self) -> bool:
        return bool(self.config.get("class_folders"))

    def with_defaults(self, cfg):
        """``cfg`` with what the dataset fixes, and the options of its first run that were not
        given, filled in; UserError for contradictions."""
        config = self.config
        if cfg.class_folders != self.class_folders:
            made = "from class folders" if self.class_folders else "by tiling scenes"
            raise UserError(
                f"{opt('append')}: {self.root} was made {made}; "
                f"{'pass' if self.class_folders else 'drop'} {opt('class_folders')}"
            )
        size = self.meta["chip_size"]
        if cfg.size is not None and cfg.size != size:
            raise UserError(f"{opt('size')} {cfg.size}: {self.root} holds {size} px chips")
        task = self.meta["task"]
        if cfg.task is not None and cfg.task != task:
            raise UserError(f"{opt('task')} {cfg.task}: {self.root} is a {task} dataset")
        stored = config.get("resolution")
        if cfg.resolution is not None and stored is not None and cfg.resolution != stored:
            raise UserError(
                f"{opt('resolution')} {cfg.resolution:g}: {self.root} was tiled at {stored:g} m"
            )
        updates = {"task": task, "bands": cfg.bands or [b["name"] for b in self.meta["bands"]]}
        # Options of the first run that the new chips should share unless given again.
        for key in CARRIED_OVER:
            if getattr(cfg, key) is None and config.get(key) is not None:
                updates[key] = config[key]
        if cfg.s2_offset == "auto" and config.get("s2_offset", "auto") != "auto":
            updates["s2_offset"] = config["s2_offset"]
        if not cfg.class_folders:  # (class-folder patches keep the rule of their first import)
            updates["size"] = size
            updates |= self._scene_defaults(cfg)
        return dataclasses.replace(cfg, **updates)

    def _scene_defaults(self, cfg) -> dict:
        prov = self.meta["provenance"]
        missing = [k for k in ("crs", "split_block_px") if k not in prov]
        if missing:
            raise UserError(
                f"{self.root}: its provenance lacks {', '.join(missing)} (not "
                "written by geoexplora tile?); cannot append to it"
            )
        task = self.meta["task"]
        crs, block = prov["crs"], prov["split_block_px"]
        if cfg.crs is not None and not _same_crs(cfg.crs, crs):
            raise UserError(f"{opt('crs')} {cfg.crs}: {self.root} is in {crs}")
        if block is not None and cfg.split_block not in (None, block):
            raise UserError(
                f"{opt('split_block')} {cfg.split_block}: {self.root} was split in "
                f"blocks of {block} px"
            )
        if task != "none" and not (cfg.labels or cfg.label_raster):
            raise UserError(
                f"{opt('append')}: {self.root} is a {task} dataset; pass the labels of "
                f"the new scenes ({opt('labels')}/{opt('label_raster')})"
            )
        if task == "none" and (cfg.labels or cfg.label_raster):
            raise UserError(
                f"{opt('append')}: {self.root} has no labels (task none); drop "
                f"{opt('labels')}/{opt('label_raster')}"
            )
        updates = {"crs": crs, "split_block": block if block is not None else cfg.split_block}
        field = self.config.get("label_field")
        if cfg.labels and not cfg.label_field and field:
            log.info("--label-field %s, as in %s", field, self.root)
            updates["label_field"] = field
        return updates

    def check_matches(self, band_keys: list[str], num_frames: int, what: str) -> None:
        if band_keys != self.band_keys:
            raise UserError(
                f"{what}: bands {','.join(band_keys)} differ from {self.root}'s "
                f"{','.join(self.band_keys)}"
            )
        if num_frames != self.meta["num_frames"]:
            raise UserError(
                f"{what}: {num_frames} date(s), {self.root} holds {self.meta['num_frames']}"
            )

    # ------------------------------------------------------------------ sources and ids

    def known_sources(self) -> set:
        """Every file behind an existing chip, resolved (a URI as it was given)."""
        from geoexplora.io.remote import as_path

        return {as_path(p).resolve() for s in self.index["source"] for p in str(s).split(";") if p}

    def next_scene_number(self) -> int:
        numbers = [
            int(m.group(1)) for cid in self.index["chip_id"] if (m := SCENE_ID.match(str(cid)))
        ]
        return max(numbers, default=-1) + 1

    def chip_ids(self) -> set[str]:
        return set(self.index["chip_id"].astype(str))

    # ------------------------------------------------------------------ classes

    def merge_classes(self, classes: list) -> tuple[list, np.ndarray]:
        """The dataset's classes plus new names (next ids), and a uint8 lookup table from the new
        labels' ids to the merged ids (255 stays 255)."""
        from geoexplora.io.labels import MAX_CLASSES, LabelClass

        merged = [
            LabelClass(c["id"], c["name"], c["color"], c.get("value")) for c in self.meta["classes"]
        ]
        by_name = {c.name: c for c in merged}
        lut = np.full(256, C.IGNORE_INDEX, dtype=np.uint8)
        next_id = max((c.id for c in merged), default=-1) + 1
        added = []
        for cl in classes:
            known = by_name.get(cl.name)
            if known is None:
                if next_id >= MAX_CLASSES:
                    raise UserError(f"{opt('append')}: more than {MAX_CLASSES} classes in all")
                known = LabelClass(next_id, cl.name, C.class_color(next_id), cl.value)
                merged.append(known)
                by_name[cl.name] = known
                added.append(cl.name)
                next_id += 1
            lut[cl.id] = known.id
        if added:
            log.info("new classes: %s", ", ".join(added))
        return merged, lut

    # ------------------------------------------------------------------ splits

    def split_res(self) -> float:
        """The pixel size split blocks were measured in: the first scene's, as in the first run."""
        first = self.index.iloc[int(np.argmin(self.index["chip_id"].astype(str).to_numpy()))]
        west, _south, east, _north = first.geometry.bounds
        return (east - west) / float(first["width"])

    def block_splits(self, block_m: float) -> dict[tuple[int, int], str]:
        """Split block -> the split of the old chips in it (the most common one)."""
        import shapely

        centres = shapely.centroid(self.index.geometry.values)
        xs = np.floor(shapely.get_x(centres) / block_m).astype(np.int64)
        ys = np.floor(shapely.get_y(centres) / block_m).astype(np.int64)
        votes: dict[tuple[int, int], Counter] = {}
        for key, split in zip(zip(xs.tolist(), ys.tolist()), self.index["split"]):
            votes.setdefault(key, Counter())[split] += 1
        return {k: v.most_common(1)[0][0] for k, v in votes.items()}

    def drop_overlapping(self, cands, res: float) -> None:
        """New candidates overlapping an old chip of another split are dropped (old chips win)."""
        import shapely
        from shapely.strtree import STRtree

        live = np.flatnonzero(cands.drop == "")
        if live.size == 0 or self.index.empty:
            return
        old = shapely.buffer(self.index.geometry.values, -1e-3 * res, join_style="mitre")
        new_idx, old_idx = STRtree(old).query(cands.boxes[live], predicate="intersects")
        old_split = self.index["split"].to_numpy()[old_idx]
        clash = old_split != cands.split[live[new_idx]]
        cands.drop[live[np.unique(new_idx[clash])]] = "split_buffer"

    # ------------------------------------------------------------------ statistics and counts

    def thinned_sample(self, new_chips: int, seed: int) -> np.ndarray:
        """The stored pixel sample thinned to the old chips' share of all chips."""
        old = len(self.index)
        keep = round(len(self.sample) * old / (old + new_chips))
        picked = np.random.default_rng((seed, old)).permutation(len(self.sample))[:keep]
        return self.sample[np.sort(picked)]

    def class_pixels(self, num_classes: int) -> np.ndarray:
        """Labelled pixels per class id of the old chips (segmentation datasets)."""
        pixels = np.zeros(max(num_classes, 1), dtype=np.int64)
        stored = self.meta["counts"].get("class_pixels", {})
        for c in self.meta["classes"]:
            pixels[c["id"]] = stored.get(c["name"], 0)
        return pixels

    def old_records(self) -> list[dict]:
        return self.index.to_dict("records")

    def dropped(self) -> Counter:
        return Counter(self.meta["counts"].get("dropped", {}))

    def provenance(self, run: dict) -> dict:
        """The dataset's provenance with this run added to its ``appended`` list."""
        prov = dict(self.meta["provenance"])
        if prov.get("split_block_px") is None:  # the first run did not split; this one may have
            prov["split_block_px"] = run.get("split_block_px")
        prov["sources"] = list(prov.get("sources", [])) + run["sources"]
        prov["appended"] = [
            *list(prov.get("appended", [])),
            {k: run[k] for k in ("created", "version", "sources", "config")},
        ]
        return prov


def _same_crs(a, b) -> bool:
    from rasterio.crs import CRS

    from geoexplora.io.scene import crs_equivalent

    try:
        ca, cb = CRS.from_user_input(a), CRS.from_user_input(b)
    except Exception as exc:  # rasterio's CRSError
        raise UserError(f"{opt('crs')} {a}: not a CRS ({exc})") from exc
    return ca == cb or crs_equivalent(ca, cb)


def link_dataset(src: Path, dst: Path) -> None:
    """Fill ``dst`` with ``src``'s chips and masks (hard links; copies where linking fails) and its
    other files (copies), leaving out the files an append rewrites."""
    rewritten = {C.META_NAME, C.INDEX_NAME, C.STATS_SAMPLE_NAME}
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        target = dst / entry.name
        if entry.name in rewritten:
            continue
        if entry.is_symlink():
            raise UserError(f"{entry}: a symbolic link inside the dataset; refusing to follow it")
        if entry.name in (C.CHIPS_DIR, C.MASKS_DIR) and entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True)
        else:
            shutil.copy2(entry, target)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
