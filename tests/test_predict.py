"""``geoexplora predict`` end to end: real scenes in, COGs out (grid, dtype, nodata, colours),
band checks, nodata policy, shards, resume, bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import ROOT, run_cli
from factories import make_model

from geoexplora.sample import s2_tile_crop, slovenia_scenes

L8 = "/landsat8-224078-2020-05-18/LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
S2_TILE = "/s2-l2a-29RKH-2020-02-19/S2A_29RKH_20200219_L2A_12band_200m.tif"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {
        "seg": make_model(d / "seg.pt"),
        "cls": make_model(d / "cls.pt", task="classification"),
        "l8": make_model(d / "l8.pt", bands=("landsat8:B2", "landsat8:B3", "landsat8:B4")),
        "s2t5": make_model(d / "s2t5.pt", frames=5),
    }


def predict(*args):
    code, out, err = run_cli("-q", "predict", *map(str, args))
    return code, out, err


def read(path):
    """(pixels, profile, scales)."""
    with rasterio.open(path) as src:
        return src.read(), src.profile, src.scales


def test_landsat8_class_map_keeps_grid_nodata_and_carries_colours(models, shared_data, tmp_path):
    src_path = str(shared_data) + L8
    out = tmp_path / "l8.tif"
    code, _, err = predict(
        models["l8"],
        src_path,
        "-o",
        out,
        "--band-map",
        "1=B2,2=B3,3=B4",
        "--nodata",
        "0",
        "--window",
        "112",
        "--overlap",
        "28",
        "--batch-size",
        "16",
    )
    assert code == 0, err
    with rasterio.open(src_path) as src, rasterio.open(out) as dst:
        raw = src.read()
        assert dst.crs == src.crs and dst.transform == src.transform
        assert (dst.width, dst.height) == (src.width, src.height) == (2041, 1860)
        assert dst.dtypes == ("uint8",) and dst.nodata == 255
        assert dst.colormap(1)[0] == (0, 0, 255, 255) and dst.colormap(1)[1] == (255, 255, 0, 255)
        assert dst.tags()["CLASS_1"] == "crop"
        assert [c["name"] for c in json.loads(dst.tags()["CLASSES"])] == ["water", "crop", "tree"]
        assert dst.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert dst.overviews(1) and dst.profile["tiled"]
        classes = dst.read(1)
    invalid = (raw == 0).any(axis=0)
    assert invalid.any() and (~invalid).any()
    assert (classes[invalid] == 255).all()
    assert np.isin(classes[~invalid], [0, 1, 2]).all()
    assert len(np.unique(classes[~invalid])) > 1
    sidecar = json.loads((tmp_path / "l8.tif.json").read_text())
    assert sidecar["valid_pixels"] == int((~invalid).sum())
    assert [m["model_band"] for m in sidecar["band_mapping"]] == [
        "landsat8:B2",
        "landsat8:B3",
        "landsat8:B4",
    ]
    assert len(sidecar["model"]["sha256"]) == 64 and sidecar["plan"]["window"] == 112


def test_sentinel2_probabilities_and_uncertainty(models, shared_data, tmp_path):
    out = tmp_path / "s2.tif"
    code, _, err = predict(
        models["seg"],
        str(shared_data) + S2_TILE,
        "-o",
        out,
        "--probabilities",
        "--prob-dtype",
        "uint8",
        "--uncertainty",
    )
    assert code == 0, err
    classes, cprof, _ = read(out)
    probs, pprof, scales = read(tmp_path / "s2_probabilities.tif")
    unc, uprof, _ = read(tmp_path / "s2_uncertainty.tif")
    assert pprof["dtype"] == "uint8" and pprof["nodata"] == 255 and probs.shape == (3, 549, 549)
    assert scales == pytest.approx((1 / 254,) * 3)
    assert pprof["transform"] == cprof["transform"] == uprof["transform"]
    top = np.sort(probs, axis=0)
    unique = top[-1] > top[-2]  # quantised probabilities can tie
    assert unique.mean() > 0.95
    np.testing.assert_array_equal(probs.argmax(axis=0)[unique], classes[0][unique])
    assert np.abs(probs.astype(int).sum(axis=0) - 254).max() <= 2
    assert uprof["dtype"] == "float32" and unc.shape == (2, 549, 549)
    assert np.nanmin(unc) >= 0 and np.nanmax(unc) <= 1 + 1e-6
    assert unc[1].max() > 0  # some overlapping windows disagree


def test_five_dates_smaller_than_one_window(models, tmp_path):
    """The bundled Slovenia series (5 files, 100 x 101 px) with a 5-date model, window 112:
    one padded window; the output has the input's size and grid."""
    out = tmp_path / "slo.tif"
    code, _, err = predict(models["s2t5"], *slovenia_scenes(), "-o", out, "--window", "112")
    assert code == 0, err
    with rasterio.open(slovenia_scenes()[0]) as src, rasterio.open(out) as dst:
        assert (dst.width, dst.height) == (100, 101) and dst.transform == src.transform
        assert (dst.read(1) != 255).all()
    sidecar = json.loads((tmp_path / "slo.tif.json").read_text())
    assert sidecar["plan"]["windows"] == 1
    assert sidecar["scene"]["dates"] == [
        "2015-07-11",
        "2015-07-31",
        "2015-08-20",
        "2015-08-30",
        "2015-09-09",
    ]
    assert len(sidecar["band_mapping"]) == 20


def test_a_single_date_model_refuses_a_time_series(models, tmp_path):
    code, _, err = predict(models["seg"], *slovenia_scenes(), "-o", tmp_path / "x.tif")
    assert code == 2 and "single date" in err
    assert not list(tmp_path.iterdir())


def test_missing_band_is_an_error_naming_it(models, shared_data, tmp_path):
    code, _, err = predict(
        models["seg"],
        str(shared_data) + L8,
        "-o",
        tmp_path / "x.tif",
        "--band-map",
        "1=B2,2=B3,3=B4",
    )
    assert code == 2
    assert "sentinel2:B8" in err and "landsat8:B2" in err
    assert not list(tmp_path.iterdir())


def test_bands_are_matched_by_name_not_position(models, tmp_path):
    """The same bands in another file order give the same prediction."""
    with rasterio.open(s2_tile_crop()) as src:
        profile, data, names = src.profile, src.read(), list(src.descriptions)
    order = list(range(len(names)))[::-1]
    shuffled = tmp_path / "reversed.tif"
    with rasterio.open(shuffled, "w", **profile) as dst:
        dst.write(data[order])
        dst.descriptions = tuple(names[i] for i in order)
    assert predict(models["seg"], s2_tile_crop(), "-o", tmp_path / "a.tif")[0] == 0
    assert predict(models["seg"], shuffled, "-o", tmp_path / "b.tif")[0] == 0
    np.testing.assert_array_equal(read(tmp_path / "a.tif")[0], read(tmp_path / "b.tif")[0])


def test_all_nodata_raster_gives_an_all_nodata_output_and_a_warning(models, tmp_path):
    with rasterio.open(s2_tile_crop()) as src:
        profile, names = src.profile, src.descriptions
    empty = tmp_path / "empty.tif"
    with rasterio.open(empty, "w", **{**profile, "nodata": 0}) as dst:
        dst.write(np.zeros((profile["count"], 256, 256), dtype=profile["dtype"]))
        dst.descriptions = names
    code, out, err = run_cli(
        "predict", str(models["seg"]), str(empty), "-o", str(tmp_path / "p.tif"), "--json"
    )
    assert code == 0
    assert "no valid pixel" in err
    assert json.loads(out)["results"][0]["valid_pixels"] == 0
    classes, profile, _ = read(tmp_path / "p.tif")
    assert profile["nodata"] == 255 and (classes == 255).all()


def test_existing_output_needs_overwrite(models, tmp_path):
    out = tmp_path / "p.tif"
    assert predict(models["seg"], s2_tile_crop(), "-o", out)[0] == 0
    before = out.read_bytes()
    code, _, err = predict(models["seg"], s2_tile_crop(), "-o", out)
    assert code == 2 and "--overwrite" in err and out.read_bytes() == before
    assert predict(models["seg"], s2_tile_crop(), "-o", out, "--overwrite")[0] == 0


def test_dry_run_prints_the_plan_and_writes_nothing(models, tmp_path):
    code, out, err = predict(
        models["seg"],
        s2_tile_crop(),
        "-o",
        tmp_path / "p.tif",
        "--dry-run",
        "--json",
        "--overlap",
        "14",
        "--batch-size",
        "5",
    )
    assert code == 0, err
    plan = json.loads(out)["results"][0]
    assert plan["plan"]["windows"] == 36 and plan["batches"] == 8  # 6 x 6 windows, stride 42
    assert [m["model_band"] for m in plan["band_mapping"]][-1] == "sentinel2:B8"
    assert plan["band_mapping"][-1]["file_band"] == 8
    assert 0 < plan["memory"]["total_bytes"] < 2**30
    assert not list(tmp_path.iterdir())


def test_shards_merged_equal_the_single_run(models, shared_data, tmp_path):
    src = str(shared_data) + S2_TILE  # 549 rows: 3 strips of 256 rows
    assert predict(models["seg"], src, "-o", tmp_path / "single.tif", "--probabilities")[0] == 0
    code, out, _ = predict(
        models["seg"],
        src,
        "-o",
        tmp_path / "sharded.tif",
        "--probabilities",
        "--shard",
        "2/2",
        "--json",
    )
    assert code == 0 and json.loads(out)["results"][0]["status"] == "partial"
    assert not (tmp_path / "sharded.tif").exists()
    code, out, _ = predict(
        models["seg"],
        src,
        "-o",
        tmp_path / "sharded.tif",
        "--probabilities",
        "--shard",
        "1/2",
        "--json",
    )
    assert code == 0 and json.loads(out)["results"][0]["status"] == "complete"
    for name in ("{}.tif", "{}_probabilities.tif"):
        a, pa, _ = read(tmp_path / name.format("single"))
        b, pb, _ = read(tmp_path / name.format("sharded"))
        np.testing.assert_array_equal(a, b)
        assert pa["transform"] == pb["transform"]
    assert not (tmp_path / ".sharded.tif.parts").exists()


def test_resume_after_an_interruption_equals_the_single_run(
    models, shared_data, tmp_path, monkeypatch
):
    from geoexplora.io.writers import StripStore

    src = str(shared_data) + S2_TILE
    assert predict(models["seg"], src, "-o", tmp_path / "single.tif")[0] == 0
    original = StripStore._write_strip

    def write_then_die(self, i, data):
        original(self, i, data)
        raise KeyboardInterrupt  # as if killed right after the first strip reached the disk

    monkeypatch.setattr(StripStore, "_write_strip", write_then_die)
    code, _, _ = predict(models["seg"], src, "-o", tmp_path / "resumed.tif")
    assert code == 130 and not (tmp_path / "resumed.tif").exists()
    monkeypatch.setattr(StripStore, "_write_strip", original)
    code, _, err = predict(models["seg"], src, "-o", tmp_path / "resumed.tif")
    assert code == 2 and "--resume" in err  # a plain rerun does not silently restart
    code, out, err = predict(
        models["seg"], src, "-o", tmp_path / "resumed.tif", "--resume", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["results"][0]["strips"]["this_run"] == 2
    np.testing.assert_array_equal(
        read(tmp_path / "single.tif")[0], read(tmp_path / "resumed.tif")[0]
    )


def test_classification_grid_has_one_cell_per_stride(models, tmp_path):
    out = tmp_path / "grid.tif"
    code, _, err = predict(models["cls"], s2_tile_crop(), "-o", out, "--overlap", "14")
    assert code == 0, err
    with rasterio.open(s2_tile_crop()) as src, rasterio.open(out) as dst:
        assert (dst.width, dst.height) == (7, 7)  # ceil(256 / 42)
        assert dst.transform == src.transform @ Affine.scale(42)
        assert dst.crs == src.crs


def test_classification_dense_is_per_pixel(models, tmp_path):
    out = tmp_path / "dense.tif"
    assert predict(models["cls"], s2_tile_crop(), "-o", out, "--dense")[0] == 0
    classes, _, _ = read(out)
    assert classes.shape == (1, 256, 256) and (classes != 255).all()


def test_several_inputs_to_a_folder_and_paths_from_stdin(models, tmp_path):
    crop = s2_tile_crop()
    folder = tmp_path / "out"
    code, _, err = run_cli(
        "-q",
        "predict",
        str(models["seg"]),
        "-",
        str(crop),
        "-o",
        f"{folder}/",
        input=f"{slovenia_scenes()[0]}\n",
    )
    assert code == 0, err
    names = sorted(p.name for p in folder.glob("*.tif"))
    assert names == sorted([crop.stem + ".tif", slovenia_scenes()[0].stem + ".tif"])


def test_vectorize_writes_polygons_with_class_and_area(models, tmp_path):
    import geopandas as gpd

    out, gpkg = tmp_path / "p.tif", tmp_path / "p.gpkg"
    assert predict(models["seg"], s2_tile_crop(), "-o", out, "--vectorize", gpkg)[0] == 0
    gdf = gpd.read_file(gpkg)
    classes, profile, _ = read(out)
    assert set(gdf["class"]) == set(np.unique(classes)) - {255}
    assert set(gdf["name"]) <= {"water", "crop", "tree"}
    pixel_area = abs(profile["transform"].a * profile["transform"].e)
    assert gdf["area"].sum() == pytest.approx((classes != 255).sum() * pixel_area)
    assert gdf.crs == profile["crs"]


def _mosaic_vrt(source: Path, size: int, bands: list[int], names: list[str]) -> str:
    """A size x size VRT tiling ``source`` (no large file on disk)."""
    with rasterio.open(source) as src:
        w, h, t, crs, dtype = src.width, src.height, src.transform, src.crs, src.dtypes[0]
    gdal_type = {"uint16": "UInt16"}[dtype]
    lines = [
        f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}">',
        f"<SRS>{crs.to_wkt().replace('&', '&amp;').replace('<', '&lt;')}</SRS>",
        f"<GeoTransform>{t.c}, {t.a}, 0, {t.f}, 0, {t.e}</GeoTransform>",
    ]
    for k, (band, name) in enumerate(zip(bands, names), start=1):
        lines.append(
            f'<VRTRasterBand dataType="{gdal_type}" band="{k}">'
            f"<Description>{name}</Description><NoDataValue>0</NoDataValue>"
        )
        for y in range(0, size, h):
            for x in range(0, size, w):
                lines.append(
                    f'<SimpleSource><SourceFilename relativeToVRT="0">{source}'
                    f"</SourceFilename><SourceBand>{band}</SourceBand>"
                    f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
                    f'<DstRect xOff="{x}" yOff="{y}" xSize="{w}" ySize="{h}"/>'
                    "</SimpleSource>"
                )
        lines.append("</VRTRasterBand>")
    return "\n".join([*lines, "</VRTDataset>"])


MEMORY_LIMIT_BYTES = 2 * 2**30


def test_a_20000_pixel_wide_raster_streams_in_bounded_memory(models, shared_data, tmp_path):
    """A 20 000 x 20 000 VRT mosaic of the real Sentinel-2 tile; to keep the run short only
    shard 1/79 (one strip of 256 rows, all 20 000 columns: ~950 windows) is predicted. Memory
    depends on the width, not the height, so the strip shows the bound. Peak RSS of the child
    process (torch included) must stay under 2 GiB."""
    vrt = tmp_path / "big.vrt"
    vrt.write_text(
        _mosaic_vrt(
            Path(str(shared_data) + S2_TILE), 20000, [2, 3, 4, 8], ["B02", "B03", "B04", "B08"]
        )
    )
    code = (
        "import resource, sys; from geoexplora.cli import main; rc = main(sys.argv[1:]); "
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); "
        "sys.exit(rc)"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "-q",
            "predict",
            str(models["seg"]),
            str(vrt),
            "-o",
            str(tmp_path / "big.tif"),
            "--shard",
            "1/79",
            "--window",
            "112",
            "--overlap",
            "28",
            "--batch-size",
            "16",
            "--sensor",
            "sentinel2",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout[: proc.stdout.rindex("PEAK_KB")])["results"][0]
    assert result["status"] == "partial" and result["strips"]["this_run"] == 1
    assert result["timings"]["windows"] == 4 * 238  # 4 window rows touch rows 0-255
    peak = int(proc.stdout.rsplit("PEAK_KB", 1)[1]) * 1024
    assert peak < MEMORY_LIMIT_BYTES, f"peak RSS {peak / 2**20:.0f} MiB"
    strip = next((tmp_path / ".big.tif.parts" / "classes").glob("rows_*.tif"))
    with rasterio.open(strip) as s:
        assert (s.width, s.height) == (20000, 256)
