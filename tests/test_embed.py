"""``geoexplora embed``: patch embeddings as a georeferenced raster at patch resolution."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import run_cli
from factories import make_model

from geoexplora.sample import s2_tile_crop


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("models") / "backbone.pt", task=None)


def embed(*args):
    return run_cli("-q", "embed", *map(str, args))


def test_embeddings_are_at_patch_resolution_on_the_input_grid(backbone, tmp_path):
    out = tmp_path / "emb.tif"
    code, _, err = embed(backbone, s2_tile_crop(), "-o", out)
    assert code == 0, err
    with rasterio.open(s2_tile_crop()) as src, rasterio.open(out) as dst:
        assert dst.count == 32 and dst.dtypes[0] == "float32"
        assert (dst.width, dst.height) == (19, 19)  # ceil(256 / 14)
        assert dst.transform == src.transform @ Affine.scale(14) and dst.crs == src.crs
        assert np.isnan(dst.nodata) and np.isfinite(dst.read()).all()
        assert dst.descriptions[0] == "dim0"
    sidecar = json.loads((tmp_path / "emb.tif.json").read_text())
    assert sidecar["embed_dim"] == 32 and sidecar["patch_size"] == 14


def test_pca_reduces_to_k_float16_bands_ordered_by_variance(backbone, tmp_path):
    out = tmp_path / "pca.tif"
    code, _, err = embed(backbone, s2_tile_crop(), "-o", out, "--pca", "3", "--dtype", "float16")
    assert code == 0, err
    with rasterio.open(out) as dst:
        assert dst.count == 3 and dst.tags(1, ns="IMAGE_STRUCTURE").get("NBITS") == "16"
        pcs = dst.read().reshape(3, -1)
    variances = pcs.var(axis=1)
    assert variances[0] >= variances[1] >= variances[2] > 0
    ratio = json.loads((tmp_path / "pca.tif.json").read_text())["pca"]["explained_variance_ratio"]
    assert len(ratio) == 3 and ratio[0] >= ratio[1] and sum(ratio) <= 1


def test_window_must_be_a_multiple_of_the_patch_size(backbone, tmp_path):
    code, _, err = embed(backbone, s2_tile_crop(), "-o", tmp_path / "x.tif", "--window", "50")
    assert code == 2 and "--window 50" in err and "14" in err


def test_nodata_patches_are_nodata(backbone, tmp_path):
    with rasterio.open(s2_tile_crop()) as src:
        profile, data, names = src.profile, src.read(), src.descriptions
    data[:, :, :140] = 0  # the left 10 patch columns
    holed = tmp_path / "holed.tif"
    with rasterio.open(holed, "w", **{**profile, "nodata": 0}) as dst:
        dst.write(data)
        dst.descriptions = names
    assert embed(backbone, holed, "-o", tmp_path / "e.tif")[0] == 0
    with rasterio.open(tmp_path / "e.tif") as dst:
        emb = dst.read()
    assert np.isnan(emb[:, :, :10]).all() and np.isfinite(emb[:, :, 10:]).all()
