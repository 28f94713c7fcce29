"""Output products: how blended strips become the bands of each output raster.

* ``classes``: arg-max class id, the smallest unsigned dtype, nodata = the dtype's maximum,
  colour table and class names embedded, mode overviews.
* ``probabilities``: one band per class, float32 (NaN nodata) or uint8 scaled by 1/254
  (255 nodata; the scale is stored in the file, so GDAL/QGIS show 0..1).
* ``uncertainty``: normalised entropy of the blended probabilities (0 certain .. 1 uniform) and,
  for per-pixel maps, overlap disagreement: the share of the overlapping windows' blending
  weight whose own arg-max differs from the output class (0 where one window decides).
* ``embedding``: the blended patch embeddings (optionally PCA-reduced), float32 or float16.

Every product is nodata wherever the blended weight is 0 (no valid input pixel).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from geoexplora.inference.engine import Strip
from geoexplora.io.writers import RasterSpec, class_colormap, class_dtype

ProbDtype = Literal["float32", "uint8"]
EmbedDtype = Literal["float32", "float16"]
PROB_DTYPES: tuple[str, ...] = get_args(ProbDtype)
EMBED_DTYPES: tuple[str, ...] = get_args(EmbedDtype)
UINT8_PROB_SCALE = 254.0


@dataclass
class Product:
    key: str
    path: Path
    spec: RasterSpec
    render: Callable[[Strip], np.ndarray]


def sibling(path: Path, suffix: str) -> Path:
    """``pred.tif`` -> ``pred_<suffix>.tif``."""
    return path.with_name(f"{path.stem}_{suffix}{path.suffix or '.tif'}")


def _probabilities(strip: Strip) -> np.ndarray:
    return strip.values / np.where(strip.valid, strip.weight, 1.0)


def class_products(
    output: Path,
    grid: dict,
    classes: list[dict],
    *,
    probabilities: bool,
    prob_dtype: str,
    uncertainty: bool,
    disagreement: bool,
    tags: dict,
) -> list[Product]:
    """Products of a classifier/segmenter. ``grid``: crs, transform, width, height."""
    k = len(classes)
    dtype, nodata = class_dtype(k)
    names = [str(c["name"]) for c in classes]
    class_tags = {
        **tags,
        "CLASSES": json.dumps(classes),
        **{f"CLASS_{int(c['id'])}": str(c["name"]) for c in classes},
    }

    def render_classes(strip: Strip) -> np.ndarray:
        out = strip.values.argmax(axis=0).astype(dtype)
        out[~strip.valid] = nodata
        return out[None]

    products = [
        Product(
            "classes",
            output,
            RasterSpec(
                **grid,
                count=1,
                dtype=dtype,
                nodata=nodata,
                descriptions=["class"],
                resampling="mode",
                colormap=class_colormap(classes),
                tags=class_tags,
            ),
            render_classes,
        )
    ]

    if probabilities:
        if prob_dtype == "uint8":

            def render_probs(strip: Strip) -> np.ndarray:
                p = np.rint(_probabilities(strip) * UINT8_PROB_SCALE).clip(0, UINT8_PROB_SCALE)
                out = p.astype(np.uint8)
                out[:, ~strip.valid] = 255
                return out

            spec = RasterSpec(
                **grid,
                count=k,
                dtype="uint8",
                nodata=255,
                descriptions=[f"p({n})" for n in names],
                scale=1.0 / UINT8_PROB_SCALE,
                tags=class_tags,
            )
        else:

            def render_probs(strip: Strip) -> np.ndarray:
                p = _probabilities(strip).astype(np.float32)
                p[:, ~strip.valid] = np.nan
                return p

            spec = RasterSpec(
                **grid,
                count=k,
                dtype="float32",
                nodata=math.nan,
                descriptions=[f"p({n})" for n in names],
                tags=class_tags,
            )
        products.append(
            Product("probabilities", sibling(output, "probabilities"), spec, render_probs)
        )

    if uncertainty:
        bands = ["entropy (normalised)"] + (["overlap disagreement"] if disagreement else [])

        def render_uncertainty(strip: Strip) -> np.ndarray:
            p = _probabilities(strip).clip(1e-12, 1.0)
            entropy = -(p * np.log(p)).sum(axis=0) / (math.log(k) if k > 1 else 1.0)
            out = [entropy]
            if disagreement:
                winner = strip.values.argmax(axis=0)
                agreeing = np.take_along_axis(strip.votes, winner[None], axis=0)[0]
                out.append(1.0 - agreeing / np.where(strip.valid, strip.weight, 1.0))
            arr = np.stack(out).astype(np.float32)
            arr[:, ~strip.valid] = np.nan
            return arr

        products.append(
            Product(
                "uncertainty",
                sibling(output, "uncertainty"),
                RasterSpec(
                    **grid,
                    count=len(bands),
                    dtype="float32",
                    nodata=math.nan,
                    descriptions=bands,
                    tags=tags,
                ),
                render_uncertainty,
            )
        )
    return products


def embedding_product(
    output: Path, grid: dict, channels: int, dtype: str, tags: dict, names: list[str] | None = None
) -> Product:
    def render(strip: Strip) -> np.ndarray:
        e = (strip.values / np.where(strip.valid, strip.weight, 1.0)).astype(np.float32)
        e[:, ~strip.valid] = np.nan
        return e

    names = names or [f"embedding {i}" for i in range(channels)]
    return Product(
        "embedding",
        output,
        RasterSpec(
            **grid, count=channels, dtype=dtype, nodata=math.nan, descriptions=names, tags=tags
        ),
        render,
    )
