"""Reading scenes: every shared data set, with its trap, as one (time, band, y, x) stack."""

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from geoexplora.errors import UserError
from geoexplora.io.scene import SceneOptions, open_scene, parse_date, scene_options

L8 = "landsat8-224078-2020-05-18/LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
S2_STACK = "s2-l2a-29RKH-2020-02-19/S2A_29RKH_20200219_L2A_12band_200m.tif"


def test_slovenia_five_dates_become_five_frames(shared_data):
    files = sorted((shared_data / "s2-l1c-slovenia-2015").glob("S2L1C_*_13band_10m.tif"))
    scene = open_scene(files, SceneOptions(bands=["B2", "B3", "B4", "B8"]))
    assert scene.shape == (5, 4, 101, 100)
    assert scene.dates == ["2015-07-11", "2015-07-31", "2015-08-20", "2015-08-30", "2015-09-09"]
    assert [b.key for b in scene.bands] == [
        "sentinel2:B2",
        "sentinel2:B3",
        "sentinel2:B4",
        "sentinel2:B8",
    ]
    assert scene.crs.to_epsg() == 32633


def test_float_reflectance_is_scaled_to_canonical_units(shared_data):
    path = shared_data / "s2-l1c-slovenia-2015" / "S2L1C_2015-07-11_13band_10m.tif"
    scene = open_scene([path], SceneOptions(bands=["B4"]))
    with rasterio.open(path) as src:
        raw = src.read(4)
    np.testing.assert_allclose(scene.read()[0, 0], raw * 10000, rtol=1e-6)


def test_bands_follow_the_requested_order(shared_data):
    scene = open_scene([shared_data / S2_STACK], SceneOptions(bands=["B4", "B3", "B2"]))
    with rasterio.open(shared_data / S2_STACK) as src:
        red = src.read(4, window=Window(0, 0, 8, 8)).astype("float32")
    data = scene.read(Window(0, 0, 8, 8))
    np.testing.assert_array_equal(np.nan_to_num(data[0, 0]), red)  # nodata 0 -> NaN -> 0


def test_one_file_per_band_at_three_resolutions_share_the_finest_grid(shared_data):
    scene = open_scene([shared_data / "s2-l2a-29RKH-2020-02-19" / "original"])
    assert scene.shape == (1, 12, 1098, 1098)
    assert scene.res == (100.0, 100.0)
    assert [b.name for b in scene.bands] == [
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
    with rasterio.open(shared_data / "s2-l2a-29RKH-2020-02-19" / "original" / "B02.tif") as src:
        assert scene.transform == src.transform
    data = scene.read(Window(500, 500, 16, 16))
    assert np.isfinite(data).all()
    # the 20 m band (B8A, stored at 200 m) is resampled, so neighbours of one source pixel vary
    assert data[0, 8].std() > 0


def test_resolution_option_resamples(shared_data):
    scene = open_scene([shared_data / S2_STACK], SceneOptions(resolution=400))
    assert (scene.width, scene.height) == (274, 274) or scene.res == (400.0, 400.0)
    assert scene.res == (400.0, 400.0)


def test_landsat8_without_descriptions_needs_a_band_map(shared_data):
    with pytest.raises(UserError, match=r"cannot tell which bands .*or band_map 1=B2"):
        open_scene([shared_data / L8])


def test_landsat8_band_map_and_sensor_from_product_name(shared_data):
    scene = open_scene([shared_data / L8], scene_options(band_map="1=B2,2=B3,3=B4", nodata=0))
    assert [b.key for b in scene.bands] == ["landsat8:B2", "landsat8:B3", "landsat8:B4"]
    assert scene.dates == ["2020-05-18"]
    corner = scene.read(Window(0, 0, 4, 4))
    assert np.isnan(corner).all()  # 0 outside the footprint is nodata with --nodata 0


def test_landsat7_float_nodata_and_band_in_second_file(shared_data):
    d = shared_data / "landsat7-nc-2000"
    bm = ",".join([f"landsat_multiband:{i}=B{i}" for i in range(1, 6)] + ["lsat7_2000_70:1=B7"])
    scene = open_scene(
        [d / "landsat_multiband.tif", d / "lsat7_2000_70.tif"],
        scene_options(sensor="landsat7", band_map=bm),
    )
    assert [b.name for b in scene.bands] == ["B1", "B2", "B3", "B4", "B5", "B7"]
    data = scene.read()
    with rasterio.open(d / "landsat_multiband.tif") as src:
        raw = src.read(1)
    assert np.isnan(data[0, 0][raw == -99999]).all()
    assert np.isfinite(data[0, 0][raw != -99999]).all()


def test_two_crs_codes_for_one_grid_are_the_same_grid(shared_data):
    from geoexplora.io.scene import Grid, inspect_raster, same_grid

    d = shared_data / "landsat7-nc-2000"
    scene_file = inspect_raster(d / "landsat_multiband.tif", SceneOptions(sensor="landsat7"))
    labels = inspect_raster(d / "landsat96_labelled_pixels.tif", SceneOptions(sensor="landsat7"))
    assert scene_file.crs.to_epsg() == 32119 and labels.crs.to_epsg() == 3358
    grid = Grid(scene_file.crs, scene_file.transform, scene_file.width, scene_file.height)
    assert same_grid(labels, grid)


def test_bigearthnet_per_band_files_of_one_patch(shared_data):
    folder = next((shared_data / "bigearthnet-s2-examples").glob("S2B_*"))
    scene = open_scene([folder], SceneOptions(bands=["B2", "B3", "B4", "B8", "B11"]))
    assert scene.shape == (1, 5, 120, 120)
    assert scene.res == (10.0, 10.0)
    assert scene.dates[0] is not None and scene.dates[0].startswith("2017-09-24")


def test_rgb_byte_with_rgb_sensor(shared_data):
    scene = open_scene([shared_data / "rgb-byte" / "RGB.byte.tif"], SceneOptions(sensor="rgb"))
    assert [b.key for b in scene.bands] == ["rgb:red", "rgb:green", "rgb:blue"]
    data = scene.read(Window(0, 0, 5, 5))
    assert np.isnan(data).all()  # nodata 0 in the corner


def test_boundless_window_is_nan_outside(shared_data):
    scene = open_scene([shared_data / S2_STACK], SceneOptions(bands=["B2"]))
    data = scene.read(Window(540, 540, 20, 20))
    assert data.shape == (1, 1, 20, 20)
    assert np.isnan(data[..., 9:, :]).all() and np.isnan(data[..., :, 9:]).all()


def test_dataarray_is_lazy_and_georeferenced(shared_data):
    scene = open_scene([shared_data / S2_STACK], SceneOptions(bands=["B4", "B8"]))
    da = scene.to_dataarray()
    assert da.dims == ("time", "band", "y", "x")
    assert da.shape == (1, 2, 549, 549)
    assert list(da.band.values) == ["B4", "B8"]
    assert da.rio.crs.to_epsg() == 32629
    assert da.rio.transform() == scene.transform
    window = da.isel(y=slice(100, 110), x=slice(200, 204)).values
    np.testing.assert_array_equal(window, scene.read(Window(200, 100, 4, 10)))


def test_missing_band_lists_what_the_file_has(shared_data):
    with pytest.raises(UserError, match=r"band B10 not found .*B8A"):
        open_scene([shared_data / S2_STACK], SceneOptions(bands=["B2", "B10"]))


def test_ambiguous_band_in_two_files_of_one_date(shared_data, tmp_path):
    import shutil

    src = shared_data / "s2-l2a-29RKH-2020-02-19" / "original" / "B02.tif"
    shutil.copy(src, tmp_path / "a_B02.tif")
    shutil.copy(src, tmp_path / "b_B02.tif")
    with pytest.raises(
        UserError,
        match="band B2 appears 2 times: a_B02.tif#1 .*, b_B02.tif#1 "
        r".*; give one file per band and date",
    ):
        open_scene(
            [tmp_path / "a_B02.tif", tmp_path / "b_B02.tif"],
            SceneOptions(sensor="sentinel2", bands=["B2"]),
        )


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        open_scene([tmp_path / "nope.tif"])


def test_not_a_raster_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_text("not a tiff")
    with pytest.raises(UserError, match=r"bad.tif: not a readable raster"):
        open_scene([bad])


def test_raster_without_crs_is_a_user_error(tmp_path):
    path = tmp_path / "nocrs.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=4,
        height=4,
        count=1,
        dtype="uint16",
        transform=rasterio.transform.from_origin(0, 4, 1, 1),
    ) as dst:
        dst.write(np.ones((1, 4, 4), "uint16"))
    with pytest.raises(UserError, match=r"nocrs.tif: has no CRS"):
        open_scene([path], SceneOptions(sensor="sentinel2", band_map={"1": "B2"}))


def test_sentinel2_offset_applies_after_baseline_04(tmp_path):
    path = tmp_path / "S2B_T31UFU_20230301_B04.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=2,
        height=2,
        count=1,
        dtype="uint16",
        crs="EPSG:32631",
        nodata=0,
        transform=rasterio.transform.from_origin(0, 20, 10, 10),
    ) as dst:
        dst.write(np.full((1, 2, 2), 1500, "uint16"))
    scene = open_scene([path])
    assert scene.dates == ["2023-03-01"]
    assert float(scene.read()[0, 0, 0, 0]) == 500.0
    forced = open_scene([path], SceneOptions(s2_offset="0"))
    assert float(forced.read()[0, 0, 0, 0]) == 1500.0


@pytest.mark.parametrize(
    "text,expected",
    [
        ("S2L1C_2015-07-11_13band_10m.tif", "2015-07-11"),
        ("S2A_MSIL2A_20170613T101031_87_48", "2017-06-13"),
        ("LC08_L1TP_224078_20200518_20200518_01_RT", "2020-05-18"),
        ("B04.tif", None),
    ],
)
def test_dates_from_names(text, expected):
    assert parse_date(text) == expected


def test_nan_pixels_are_nodata(tmp_path):
    path = tmp_path / "nan.tif"
    data = np.full((1, 3, 3), 0.1, "float32")
    data[0, 1, 1] = np.nan
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=3,
        height=3,
        count=1,
        dtype="float32",
        crs="EPSG:32633",
        transform=rasterio.transform.from_origin(0, 30, 10, 10),
    ) as dst:
        dst.write(data)
        dst.set_band_description(1, "B04")
    with pytest.raises(UserError, match=r"nan.tif: band names B04 fit several sensors"):
        open_scene([path])
    out = open_scene([path], SceneOptions(sensor="sentinel2")).read()
    assert np.isnan(out[0, 0, 1, 1]) and np.isfinite(out).sum() == 8


def test_sensor_qualified_band_map_needs_no_sensor_option(tmp_path):
    path = tmp_path / "plain.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=2,
        height=2,
        count=2,
        dtype="uint16",
        crs="EPSG:32633",
        transform=rasterio.transform.from_origin(0, 20, 10, 10),
    ) as dst:
        dst.write(np.full((2, 2, 2), 900, "uint16"))
    with pytest.raises(UserError, match="fit several sensors"):
        open_scene([path], scene_options(band_map="1=B2,2=B8"))
    scene = open_scene([path], scene_options(band_map="1=sentinel2:B2,2=sentinel2:B8"))
    assert [b.key for b in scene.bands] == ["sentinel2:B2", "sentinel2:B8"]
    with pytest.raises(UserError, match=r"is landsat8 .*not sentinel2"):
        open_scene([path], scene_options(sensor="landsat8", band_map="1=sentinel2:B2"))
