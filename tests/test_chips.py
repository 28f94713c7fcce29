"""The chips dataset format and its reader (geoexplora/io/chips.py), on datasets built by tile()
from the bundled real sample (tests/factories.py)."""

import json

import numpy as np
import pytest
import rasterio
import torch
from factories import KINDS, make_chips_dataset
from rasterio.windows import Window

from geoexplora import sample
from geoexplora.errors import UserError
from geoexplora.io.chips import ChipsDataset, load_dataset_meta, window_transform


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("chips")
    return {kind: make_chips_dataset(base, kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_train_and_val_chips(built, kind):
    index = ChipsDataset(built[kind]).index
    assert set(index["split"]) == {"train", "val"}


@pytest.mark.parametrize(
    "kind, frames, bands, keys",
    [
        ("classification", 1, 13, {"image", "label", "chip_id"}),
        ("segmentation", 1, 13, {"image", "label", "mask", "chip_id"}),
        ("temporal_segmentation", 5, 13, {"image", "label", "mask", "chip_id"}),
        ("multilabel", 1, 13, {"image", "label", "labels", "chip_id"}),
        ("unlabeled", 1, 12, {"image", "label", "chip_id"}),
    ],
)
def test_items_have_the_documented_keys_shapes_and_dtypes(built, kind, frames, bands, keys):
    ds = ChipsDataset(built[kind])
    item = ds[0]
    assert set(item) == keys
    assert item["image"].shape == (frames, bands, 32, 32)
    assert item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    if "mask" in item:
        assert item["mask"].shape == (32, 32) and item["mask"].dtype == torch.int64
        assert set(item["mask"].unique().tolist()) <= set(range(ds.num_classes)) | {255}
    if "labels" in item:
        assert item["labels"].shape == (ds.num_classes,) and item["labels"].dtype == torch.float32


def test_a_dataloader_batches_items(built):
    loader = torch.utils.data.DataLoader(ChipsDataset(built["temporal_segmentation"]), batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 5, 13, 32, 32)
    assert batch["mask"].shape == (4, 32, 32)


def test_split_selects_the_index_rows_of_that_split(built):
    root = built["segmentation"]
    full = ChipsDataset(root)
    val = ChipsDataset(root, split="val")
    assert len(val) == int((full.index["split"] == "val").sum())
    assert set(val.index["chip_id"]) < set(full.index["chip_id"])


def test_image_holds_the_scene_pixels_in_canonical_units(built):
    ds = ChipsDataset(built["temporal_segmentation"])
    row = ds.index.iloc[3]
    with rasterio.open(sample.slovenia_scenes()[2]) as src:  # 2015-08-20, 0-1 reflectance
        source = src.read(window=Window(row.col_off, row.row_off, 32, 32))
    np.testing.assert_allclose(ds[3]["image"][2].numpy(), source * 10_000, rtol=1e-6)


def test_chip_file_is_a_georeferenced_geotiff_with_band_dates(built):
    ds = ChipsDataset(built["temporal_segmentation"])
    row = ds.index.iloc[0]
    with rasterio.open(sample.slovenia_scenes()[0]) as scene:
        expected = window_transform(scene.transform, row.col_off, row.row_off)
        crs = scene.crs
    with rasterio.open(built["temporal_segmentation"] / row.path) as chip:
        assert chip.crs == crs
        assert chip.transform.almost_equals(expected)
        assert chip.count == 5 * 13 and chip.dtypes[0] == "float32"
        assert np.isnan(chip.nodata)
        assert chip.descriptions[0] == "B1@2015-07-11"
        assert chip.descriptions[13] == "B1@2015-07-31"
        assert chip.tags()["DATES"].split(";")[-1] == "2015-09-09"
        assert chip.tags()["BAND_KEYS"].split(";")[:2] == ["sentinel2:B1", "sentinel2:B2"]


def test_dataset_json_describes_bands_stats_and_classes(built):
    meta = load_dataset_meta(built["segmentation"])
    assert meta["format_version"] == 1 and meta["units"] == "reflectance_x10000"
    assert meta["task"] == "segmentation" and meta["chip_size"] == 32 and meta["num_frames"] == 1
    assert meta["bands"][1]["key"] == "sentinel2:B2" and meta["bands"][1]["center_nm"] == 492.7
    assert all(len(meta["stats"][k]) == 13 for k in ("mean", "std", "p2", "p98"))
    assert all(
        p2 < m < p98
        for p2, m, p98 in zip(meta["stats"]["p2"], meta["stats"]["mean"], meta["stats"]["p98"])
    )
    assert [c["name"] for c in meta["classes"]] == [
        "cultivated_land",
        "forest",
        "grassland",
        "shrubland",
        "artificial_surface",
    ]
    assert [c["id"] for c in meta["classes"]] == [0, 1, 2, 3, 4]
    assert all(c["color"].startswith("#") and len(c["color"]) == 7 for c in meta["classes"])


def test_index_is_geoparquet_with_the_documented_columns(built):
    ds = ChipsDataset(built["multilabel"])
    for column in (
        "chip_id",
        "path",
        "mask_path",
        "geometry",
        "crs",
        "source",
        "col_off",
        "row_off",
        "width",
        "height",
        "dates",
        "label",
        "labels",
        "nodata_fraction",
        "split",
    ):
        assert column in ds.index.columns
    assert ds.index.crs.to_epsg() == 32633
    assert (ds.index["crs"] == "EPSG:32633").all()


def test_multilabel_targets_match_the_labels_column(built):
    ds = ChipsDataset(built["multilabel"])
    for i in range(len(ds)):
        ids = [int(v) for v in ds.index.at[i, "labels"].split(";")]
        assert np.flatnonzero(ds[i]["labels"].numpy()).tolist() == sorted(ids)


def test_a_folder_without_dataset_json_is_not_a_dataset(built, tmp_path):
    (tmp_path / "chips").mkdir()
    with pytest.raises(UserError, match=r"dataset.json missing"):
        ChipsDataset(tmp_path)


def test_another_format_version_is_refused(built, tmp_path):
    meta = json.loads((built["unlabeled"] / "dataset.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="version 99"):
        load_dataset_meta(tmp_path)


@pytest.mark.parametrize("options", [None, {"COMPRESS": "DEFLATE"}])
def test_chips_written_from_a_template_read_back_like_gdal_writes(tmp_path, options):
    from affine import Affine
    from rasterio.crs import CRS

    from geoexplora.bands import SENSORS
    from geoexplora.io.chips import read_chip, write_chip

    with rasterio.open(sample.slovenia_scenes()[0]) as src:
        pixels = src.read(indexes=[2, 3, 4], window=Window(0, 0, 24, 16)) * 10_000
    pixels[0, 2, 3] = np.nan
    bands = list(SENSORS["sentinel2"][1:4])
    for k in range(3):  # the first write makes the template, the next ones patch it
        data = (pixels + k)[None].astype(np.float32)
        transform = Affine(10, 0, 465_000 + 240 * k, 0, -10, 5_080_000 - 160 * k)
        write_chip(
            tmp_path / f"{k}.tif",
            data,
            transform,
            CRS.from_epsg(32633),
            bands,
            ["2015-07-11"],
            options,
        )
        image, dates = read_chip(tmp_path / f"{k}.tif")
        np.testing.assert_array_equal(image, data)
        with rasterio.open(tmp_path / f"{k}.tif") as chip:
            assert chip.transform == transform and chip.crs.to_epsg() == 32633
            assert chip.descriptions == ("B2@2015-07-11", "B3@2015-07-11", "B4@2015-07-11")
            assert chip.compression == (
                None if options is None else rasterio.enums.Compression.deflate
            )
        assert dates == ["2015-07-11"]


def test_an_index_naming_files_outside_the_dataset_is_refused(tmp_path):
    import geopandas as gpd

    from geoexplora.io.chips import INDEX_NAME

    root = make_chips_dataset(tmp_path, "unlabeled")
    index = gpd.read_parquet(root / INDEX_NAME)
    index.loc[0, "path"] = "../../../etc/hostname"
    index.to_parquet(root / INDEX_NAME)
    with pytest.raises(UserError, match="outside the dataset folder"):
        ChipsDataset(root)
