"""tile(): scenes and labels -> chips, checked against the source rasters (real data)."""

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from rasterio.features import rasterize
from rasterio.windows import Window

from geoexplora import sample
from geoexplora.errors import UserError
from geoexplora.io.chips import ChipsDataset, window_bounds, window_transform
from geoexplora.pipelines.tile import TileConfig, tile

L8_DIR = "landsat8-224078-2020-05-18"
L8_NAME = "LC08_L1TP_224078_20200518_20200518_01_RT"
L8_BANDS = {"1": "B2", "2": "B3", "3": "B4"}


def _config(scenes, out, **kw):
    kw.setdefault("progress", False)
    return TileConfig(inputs=[str(s) for s in scenes], output=out, **kw)


def _l8(shared_data, out, **kw):
    scene = shared_data / L8_DIR / f"{L8_NAME}.TIF"
    kw.setdefault("size", 64)
    return _config([scene], out, band_map=L8_BANDS, nodata=0, **kw)


def _lulc_ids(window: Window) -> np.ndarray:
    """LULC values in a window -> class ids (values 1,2,3,4,8 -> 0..4), 255 for 0 (no data)."""
    with rasterio.open(sample.slovenia_labels()) as src:
        values = src.read(1, window=window, boundless=True, fill_value=0)
    lut = np.full(256, 255, dtype=np.uint8)
    lut[[1, 2, 3, 4, 8]] = np.arange(5)
    return lut[values]


# --------------------------------------------------------------------------- labels and masks


def test_landsat8_polygon_masks_match_the_polygons_rasterised_on_the_source_grid(
    shared_data, tmp_path
):
    polygons = shared_data / L8_DIR / f"{L8_NAME}_polygons.gpkg"
    result = tile(_l8(shared_data, tmp_path / "out", labels=polygons, label_field="name"))
    ds = ChipsDataset(result.output)
    assert result.task == "segmentation"
    assert [c["name"] for c in ds.classes] == ["crop", "developed", "tree", "water"]
    gdf = gpd.read_file(polygons)
    ids = gdf["name"].map({"crop": 0, "developed": 1, "tree": 2, "water": 3})
    with rasterio.open(shared_data / L8_DIR / f"{L8_NAME}.TIF") as src:
        source_transform = src.transform
        for i, row in ds.index.iterrows():
            window = Window(row.col_off, row.row_off, 64, 64)
            expected = rasterize(
                zip(gdf.geometry, ids),
                out_shape=(64, 64),
                fill=255,
                transform=window_transform(src.transform, row.col_off, row.row_off),
                dtype="uint8",
            )
            pixels = src.read(window=window).astype(np.float32)
            expected[(pixels == 0).all(axis=0)] = 255  # no label where the image has no data
            np.testing.assert_array_equal(ds.read_mask(i), expected)
            np.testing.assert_array_equal(
                ds.read_image(i)[0], np.where(pixels == 0, np.nan, pixels)
            )
            assert row.geometry.bounds == pytest.approx(
                window_bounds(source_transform, row.col_off, row.row_off, 64, 64)
            )
            with rasterio.open(result.output / row.path) as chip:
                assert chip.transform.almost_equals(
                    window_transform(source_transform, row.col_off, row.row_off)
                )
    assert len(ds) == 6


def test_landsat8_points_label_the_chip_they_fall_in(shared_data, tmp_path):
    points = shared_data / L8_DIR / f"{L8_NAME}_points.gpkg"
    result = tile(
        _l8(shared_data, tmp_path / "out", labels=points, label_field="name", val_fraction=0)
    )
    ds = ChipsDataset(result.output)
    assert result.task == "classification"
    names = [c["name"] for c in ds.classes]
    gdf = gpd.read_file(points)
    assert len(ds) == len(gdf)  # the 6 points fall in 6 different chips
    for point, name in zip(gdf.geometry, gdf["name"]):
        hit = ds.index[ds.index.geometry.contains(point)]
        assert len(hit) == 1
        assert names[int(hit.iloc[0].label)] == name


def test_slovenia_series_and_lulc_raster_give_5_frame_chips_with_masks(tmp_path):
    result = tile(
        _config(
            sample.slovenia_scenes(),
            tmp_path / "out",
            size=32,
            label_raster=sample.slovenia_labels(),
            val_fraction=0,
        )
    )
    ds = ChipsDataset(result.output)
    assert (ds.num_frames, len(ds)) == (5, 9)
    assert ds[0]["image"].shape == (5, 13, 32, 32)
    assert [c["value"] for c in ds.meta["classes"]] == [1, 2, 3, 4, 8]
    for i, row in ds.index.iterrows():
        np.testing.assert_array_equal(
            ds.read_mask(i), _lulc_ids(Window(row.col_off, row.row_off, 32, 32))
        )
    assert ds.index.iloc[0].dates == "2015-07-11;2015-07-31;2015-08-20;2015-08-30;2015-09-09"


def test_classification_label_is_the_majority_class_with_enough_share(tmp_path):
    result = tile(
        _config(
            sample.slovenia_scenes()[:1],
            tmp_path / "out",
            size=16,
            label_raster=sample.slovenia_labels(),
            task="classification",
            min_label_fraction=0.8,
            val_fraction=0,
        )
    )
    ds = ChipsDataset(result.output)
    assert 0 < len(ds) < 36 and result.dropped["unlabelled"] == 36 - len(ds)
    for _, row in ds.index.iterrows():
        counts = np.bincount(
            _lulc_ids(Window(row.col_off, row.row_off, 16, 16)).ravel(), minlength=256
        )[:5]
        assert row.label == counts.argmax() and counts.max() >= 0.8 * 256


def test_landsat7_labels_in_epsg3358_are_read_on_the_epsg32119_grid_unshifted(
    shared_data, tmp_path
):
    d = shared_data / "landsat7-nc-2000"
    band_map = {f"landsat_multiband:{i}": f"B{i}" for i in range(1, 6)} | {"lsat7_2000_70:1": "B7"}
    result = tile(
        _config(
            [d / "landsat_multiband.tif", d / "lsat7_2000_70.tif"],
            tmp_path / "o",
            sensor="landsat7",
            band_map=band_map,
            size=32,
            val_fraction=0,
            label_raster=d / "landsat96_labelled_pixels.tif",
        )
    )
    ds = ChipsDataset(result.output)
    assert [b.name for b in ds.bands] == ["B1", "B2", "B3", "B4", "B5", "B7"]
    with (
        rasterio.open(d / "landsat96_labelled_pixels.tif") as labels,
        rasterio.open(d / "landsat_multiband.tif") as scene,
    ):
        for i, row in ds.index.iterrows():
            window = Window(row.col_off, row.row_off, 32, 32)
            values = labels.read(1, window=window)
            pixels = scene.read(window=window)
            image = ds.read_image(i)[0]
            expected = np.where(values == -99999, 255, values - 1).astype(np.uint8)
            expected[~np.isfinite(image).all(axis=0)] = 255  # no label where a band has no data
            np.testing.assert_array_equal(ds.read_mask(i), expected)
            # float nodata -99999 -> NaN; valid values kept
            np.testing.assert_array_equal(np.isnan(image[:5]), pixels == -99999)
    assert (ds.index.crs.to_epsg(), len(ds)) == (32119, 35)


# --------------------------------------------------------------------------- grids


def test_sentinel2_band_files_at_three_resolutions_are_chipped_on_the_finest_grid(
    shared_data, tmp_path
):
    folder = shared_data / "s2-l2a-29RKH-2020-02-19" / "original"
    result = tile(_config([folder], tmp_path / "out", size=128, val_fraction=0))
    ds = ChipsDataset(result.output)
    assert len(ds) == (1098 // 128) ** 2
    assert [b.name for b in ds.bands] == [
        "B1",
        "B2",
        "B3",
        "B4",
        "B5",
        "B6",
        "B7",
        "B8",
        "B8A",
        "B9",
        "B11",
        "B12",
    ]
    with (
        rasterio.open(folder / "B02.tif") as b02,
        rasterio.open(result.output / ds.index.path[9]) as chip,
    ):
        row = ds.index.iloc[9]
        assert chip.res == (100.0, 100.0) and chip.crs.to_epsg() == 32629
        np.testing.assert_array_equal(
            chip.read(2),
            b02.read(1, window=Window(row.col_off, row.row_off, 128, 128)).astype(np.float32),
        )
        assert np.isfinite(chip.read()).all()  # 200 m and 600 m bands resampled onto the grid


def test_bigearthnet_band_files_make_one_10m_chip_per_patch(shared_data, tmp_path):
    patch = shared_data / "bigearthnet-s2-examples" / "S2A_MSIL2A_20170613T101031_87_48"
    result = tile(_config([patch], tmp_path / "out", size=120, val_fraction=0))
    ds = ChipsDataset(result.output)
    assert len(ds) == 1 and ds[0]["image"].shape == (1, 12, 120, 120)
    with rasterio.open(next(patch.glob("*_B04.tif"))) as b04:
        np.testing.assert_array_equal(ds.read_image(0)[0, 3], b04.read(1).astype(np.float32))
    assert ds.index.iloc[0].dates == "2017-06-13"


def test_edge_pad_covers_the_scene_with_nan_beyond_it(tmp_path):
    pad = tile(
        _config(
            sample.slovenia_scenes()[:1],
            tmp_path / "pad",
            size=32,
            edge="pad",
            max_nodata=1.0,
            val_fraction=0,
        )
    )
    drop = tile(_config(sample.slovenia_scenes()[:1], tmp_path / "drop", size=32, val_fraction=0))
    assert (pad.chips, drop.chips) == (16, 9)  # 100 x 101 px: 4 x 4 padded, 3 x 3 whole
    ds = ChipsDataset(pad.output)
    corner = ds.index.index[(ds.index.col_off == 96) & (ds.index.row_off == 96)][0]
    image = ds.read_image(corner)
    assert np.isfinite(image[0, :, :5, :4]).all() and np.isnan(image[0, :, :, 4:]).all()
    assert ds.index.nodata_fraction[corner] == pytest.approx(1 - 5 * 4 / 32**2)


def test_a_scene_smaller_than_one_chip_is_an_error_unless_padded(tmp_path):
    with pytest.raises(UserError, match="--edge pad"):
        tile(_config(sample.slovenia_scenes()[:1], tmp_path / "a", size=128))
    assert not (tmp_path / "a").exists()
    padded = tile(
        _config(
            sample.slovenia_scenes()[:1],
            tmp_path / "b",
            size=128,
            edge="pad",
            max_nodata=0.5,
            val_fraction=0,
        )
    )
    assert padded.chips == 1


def test_target_crs_reprojects_the_scenes(tmp_path):
    result = tile(
        _config(
            sample.slovenia_scenes()[:1],
            tmp_path / "out",
            size=32,
            crs="EPSG:3857",
            val_fraction=0,
            max_nodata=1.0,
        )
    )
    ds = ChipsDataset(result.output)
    assert ds.index.crs.to_epsg() == 3857 and (ds.index["crs"] == "EPSG:3857").all()
    with rasterio.open(result.output / ds.index.path[0]) as chip:
        assert chip.crs.to_epsg() == 3857


# --------------------------------------------------------------------------- filtering and splits


def test_chips_over_max_nodata_are_dropped_and_fractions_recorded(shared_data, tmp_path):
    result = tile(_l8(shared_data, tmp_path / "out", size=128, max_nodata=0.3))
    ds = ChipsDataset(result.output)
    assert result.dropped["nodata"] > 0
    assert result.chips + result.dropped["nodata"] + result.dropped.get("split_buffer", 0) == (
        1860 // 128
    ) * (2041 // 128)
    assert (ds.index.nodata_fraction <= 0.3).all() and (ds.index.nodata_fraction > 0).any()
    for i in range(0, len(ds), 25):
        assert np.isnan(ds.read_image(i)[0, 0]).mean() == pytest.approx(ds.index.nodata_fraction[i])


def test_val_and_test_chips_never_overlap_train_chips(tmp_path):
    result = tile(
        _config(
            [sample.s2_tile_crop()],
            tmp_path / "out",
            size=32,
            stride=16,
            val_fraction=0.3,
            test_fraction=0.15,
            split_block=64,
        )
    )
    index = ChipsDataset(result.output).index
    assert {"train", "val", "test"} <= set(index.split) and result.dropped["split_buffer"] > 0
    shrunk = {
        s: shapely.union_all(index[index.split == s].geometry.buffer(-0.01))
        for s in ("train", "val", "test")
    }
    assert not shrunk["train"].intersects(shrunk["val"])
    assert not shrunk["train"].intersects(shrunk["test"])
    assert not shrunk["val"].intersects(shrunk["test"])


def test_splits_depend_on_the_seed_only(tmp_path):
    def splits(name, seed):
        r = tile(
            _config(
                [sample.s2_tile_crop()],
                tmp_path / name,
                size=32,
                val_fraction=0.3,
                split_block=64,
                seed=seed,
            )
        )
        return ChipsDataset(r.output).index.set_index("chip_id")["split"].to_dict()

    assert splits("a", 1) == splits("b", 1)
    assert splits("a2", 1) != splits("c", 2)


def test_aoi_keeps_only_chips_touching_it(tmp_path):
    with rasterio.open(sample.slovenia_scenes()[0]) as src:
        west, south, _east, north = src.bounds
    aoi = gpd.GeoDataFrame(geometry=[shapely.box(west, south, west + 400, north)], crs=src.crs)
    aoi.to_crs("EPSG:4326").to_file(tmp_path / "aoi.geojson")
    result = tile(
        _config(
            sample.slovenia_scenes()[:1],
            tmp_path / "out",
            size=32,
            aoi=tmp_path / "aoi.geojson",
            val_fraction=0,
        )
    )
    ds = ChipsDataset(result.output)
    assert result.dropped["outside_aoi"] == 3 and len(ds) == 6
    assert set(ds.index.col_off) == {0, 32}


def test_parallel_workers_write_the_same_dataset(tmp_path):
    cfg = {"size": 32, "val_fraction": 0.2, "split_block": 64}
    one = tile(_config([sample.s2_tile_crop()], tmp_path / "one", workers=1, **cfg))
    two = tile(_config([sample.s2_tile_crop()], tmp_path / "two", workers=2, **cfg))
    a, b = ChipsDataset(one.output), ChipsDataset(two.output)
    assert a.index.drop(columns="geometry").equals(b.index.drop(columns="geometry"))
    np.testing.assert_array_equal(a.read_image(5), b.read_image(5))
    assert one.stats == two.stats


def test_an_interrupted_run_leaves_no_dataset(tmp_path, interrupt_fifth_chip):
    with pytest.raises(KeyboardInterrupt):
        tile(_config([sample.s2_tile_crop()], tmp_path / "out", size=32))
    assert list(tmp_path.iterdir()) == []


def test_one_file_named_twice_is_one_input(tmp_path, monkeypatch):
    import shutil

    scene = shutil.copy(sample.slovenia_scenes()[0], tmp_path / "S2L1C_2015-07-11.tif")
    monkeypatch.chdir(tmp_path)
    result = tile(
        _config(["S2L1C_2015-07-11.tif", scene], tmp_path / "out", size=32, val_fraction=0)
    )
    assert result.chips == 9 and ChipsDataset(result.output).index.source.nunique() == 1
