"""``embed``: patch embeddings of a model file as georeferenced rasters at patch resolution,
optionally PCA-reduced. Shares predict's job set-up, plan and streamed engine
(:mod:`geoexplora.pipelines.predict`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from geoexplora.config_checks import one_of
from geoexplora.defaults import PREDICT
from geoexplora.errors import UserError, opt
from geoexplora.inference.products import EmbedDtype
from geoexplora.log import reports_progress
from geoexplora.pipelines.predict import (
    RasterJobConfig,
    check_memory,
    check_outputs,
    dry_run_doc,
    finish_result,
    input_files,
    job_fingerprint,
    make_plan,
    model_name,
    open_model_scene,
    output_grid,
    owned,
    plan_jobs,
    predict_scene,
    prepare_jobs,
)
from geoexplora.provenance import package_versions
from geoexplora.results import RasterResult


@dataclass
class EmbedConfig(RasterJobConfig):
    """``geoexplora embed MODEL INPUTS -o OUTPUT`` (the shared fields: :class:`RasterJobConfig`;
    ``model`` may also be a spec, a registry/timm name). ``overlap`` defaults to window/4 rounded
    to the patch size."""

    init_weights: str | None = None  # for a model given by name: a checkpoint, or "random"
    bands: list[str] | None = None  # for a model given by name: the raster's bands to build on
    pca: int | None = None
    dtype: EmbedDtype = "float32"

    def __post_init__(self):
        super().__post_init__()
        one_of("dtype", self.dtype, EmbedDtype)


# --- embed --------------------------------------------------------------------------------------


def fit_pca(scene, plan, forward, device, k: int, sample_windows: int = PREDICT.pca_sample_windows):
    """``(mean (D,), components (k, D), explained variance ratio (k,))`` of the patch
    embeddings of up to ``sample_windows`` windows spread evenly over the raster (valid patches
    only). Signs are fixed (largest loading positive) so reruns and shards agree."""
    import numpy as np
    import torch
    from rasterio.windows import Window

    tiles = list(plan.tiles())
    step = max(1, len(tiles) // sample_windows)
    samples = []
    for tile in tiles[::step]:
        data = scene.read(Window(tile.col, tile.row, plan.window, plan.window))
        valid = plan.output_valid(np.isfinite(data).all(axis=1).any(axis=0))
        if not valid.any():
            continue
        with torch.inference_mode():
            emb = forward(torch.from_numpy(data[None]).to(device))[0].float().cpu()
        samples.append(emb.permute(1, 2, 0)[torch.from_numpy(valid)])
        if len(samples) >= sample_windows:
            break
    if not samples:
        raise UserError(f"{opt('pca')}: the raster has no valid pixel to fit the projection on")
    x = torch.cat(samples).double()
    if k > min(x.shape):
        raise UserError(
            f"{opt('pca')} {k}: at most {min(x.shape)} components from "
            f"{x.shape[0]} sampled patches of dimension {x.shape[1]}"
        )
    mean = x.mean(dim=0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    comps = vh[:k]
    signs = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
    comps = comps * signs
    ratio = (s[:k] ** 2 / (s**2).sum()).tolist()
    return mean.float(), comps.float(), ratio


def _pca_for(scene, plan, model, read, device, k: int, work: Path) -> tuple:
    """The PCA projection, fitted once per output and kept in the (prepared) work folder so
    that resumed runs and every shard use the same one."""
    import torch

    from geoexplora.inference.model import predictor_from_model

    stored = work / "pca.json"
    if stored.exists():
        doc = json.loads(stored.read_text())
        if doc["k"] == k:
            return (
                torch.tensor(doc["mean"]),
                torch.tensor(doc["components"]),
                doc["explained_variance_ratio"],
            )
    raw = predictor_from_model(model, read.days, embed=True)
    mean, comps, ratio = fit_pca(scene, plan, raw.make_forward(device), device, k)
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / f".pca.json.{os.getpid()}"
    tmp.write_text(
        json.dumps(
            {
                "k": k,
                "mean": mean.tolist(),
                "components": comps.tolist(),
                "explained_variance_ratio": ratio,
            }
        )
    )
    os.replace(tmp, stored)
    return mean, comps, ratio


def _with_source_model(cfg: EmbedConfig) -> EmbedConfig:
    """A model given by name becomes a backbone built on the first input's bands (``bands`` of
    them, or all) with its statistics; model files and modules pass as they are."""
    import dataclasses

    from geoexplora.train.features import SourceSpec, check_models

    if not isinstance(cfg.model, (str, os.PathLike)):
        return cfg
    (ref,) = check_models([cfg.model], cfg.init_weights, cfg.bands)
    if not isinstance(ref, SourceSpec):
        return cfg
    from geoexplora.pipelines.export import source_for_rasters

    first = plan_jobs(cfg.inputs, cfg.output, None)[0][0]
    return dataclasses.replace(cfg, model=source_for_rasters(ref, first, cfg.scene))


@reports_progress
def embed(cfg: EmbedConfig) -> list[RasterResult]:
    """Patch embeddings of every job of ``cfg`` as georeferenced rasters at patch resolution."""

    if cfg.pca is not None and cfg.pca < 1:
        raise UserError(f"{opt('pca')} must be at least 1")
    cfg = _with_source_model(cfg)
    jobs, devices, model, model_sha, run_opts = prepare_jobs(cfg)
    results = []
    for inputs, output in jobs:
        scene, read, mapping = open_model_scene(
            inputs, cfg.scene, model.meta, model_name(cfg.model)
        )
        with owned(scene, inputs):
            results.append(
                _embed_job(
                    cfg, inputs, output, scene, read, mapping, model, model_sha, devices, run_opts
                )
            )
    return results


def _embed_job(
    cfg, inputs, output, scene, read, mapping, model, model_sha: str, devices, run_opts
) -> RasterResult:
    """One job: one scene's embeddings into one output (or its plan, with ``dry_run``)."""
    from geoexplora.inference.model import predictor_from_model
    from geoexplora.inference.products import embedding_product
    from geoexplora.inference.runner import prepare_work, release_work, work_folder

    raw = predictor_from_model(model, read.days, embed=True)
    plan = make_plan(scene, raw, cfg.window, cfg.overlap, dense=True)
    dim = raw.channels
    channels = cfg.pca or dim
    tags = {"GEOEXPLORA_MODEL_SHA256": model_sha, "GEOEXPLORA_TASK": "embedding"}
    names = (
        [f"pc{i + 1}" for i in range(channels)] if cfg.pca else [f"dim{i}" for i in range(channels)]
    )
    product = embedding_product(output, output_grid(scene, plan), channels, cfg.dtype, tags, names)
    check_outputs([product], cfg, [], inputs)
    if cfg.dry_run:
        doc = dry_run_doc(inputs, output, scene, plan, raw, [product], mapping, cfg, devices, False)
        return RasterResult.from_report(
            {**doc, "embed_dim": dim, "pca": cfg.pca, "dtype": cfg.dtype}, dry_run=True
        )
    if cfg.pca and cfg.pca > dim:
        raise UserError(f"{opt('pca')} {cfg.pca}: the model's embeddings have {dim} dimensions")
    check_memory(scene, plan, raw, [product], cfg, devices, False, output)
    settings = {"task": "embedding", "blend": cfg.blend, "pca": cfg.pca, "dtype": cfg.dtype}
    fresh = not work_folder(output).exists()
    work = prepare_work(output, job_fingerprint(model_sha, inputs, plan, settings), run_opts)
    pca_doc = None
    predictor = raw
    if cfg.pca:
        try:
            mean, comps, ratio = _pca_for(scene, plan, model, read, devices[0], cfg.pca, work)
        except BaseException:
            # Nothing resumable yet: a work folder this run made would only block a rerun
            # (one another shard may already share is left to it).
            release_work(work)
            if fresh and not run_opts.shard:
                shutil.rmtree(work)
            raise
        predictor = predictor_from_model(model, read.days, embed=True, pca=(mean, comps))
        pca_doc = {
            "k": cfg.pca,
            "explained_variance_ratio": ratio,
            "mean": mean.tolist(),
            "components": comps.tolist(),
        }
    provenance = {
        "command": "embed",
        "model": {"path": model_name(cfg.model), "sha256": model_sha},
        "inputs": [str(p) for p in input_files(inputs)],
        "scene": scene.describe(),
        "band_mapping": mapping,
        "task": "embedding",
        "embed_dim": dim,
        "patch_size": raw.patch_size,
        "pca": pca_doc,
        "devices": [str(d) for d in devices],
        "versions": package_versions(),
    }
    result = predict_scene(
        scene, predictor, plan, [product], devices, run_opts, {}, provenance, prepared=True
    )
    return RasterResult.from_report(
        finish_result(
            {"input": [str(p) for p in input_files(inputs)], "output": str(output), **result},
            output,
        ),
        dry_run=False,
    )
