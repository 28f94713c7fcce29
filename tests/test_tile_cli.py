"""`geoexplora tile` on the command line: options, summaries and bad input (exit 2, named)."""

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
from conftest import run_cli
from rasterio.windows import Window

from geoexplora import sample
from geoexplora.io.chips import ChipsDataset

SLOVENIA_0 = str(sample.slovenia_scenes()[0])
LULC_GPKG = str(sample.sample_dir() / "slovenia" / "LULC.gpkg")


def test_json_summary_counts_chips_drops_classes_and_stats(tmp_path):
    code, out, err = run_cli(
        "tile",
        SLOVENIA_0,
        "-o",
        str(tmp_path / "c"),
        "--size",
        "32",
        "--stride",
        "16",
        "--label-raster",
        str(sample.slovenia_labels()),
        "--task",
        "classification",
        "--min-label-fraction",
        "0.6",
        "--json",
    )
    assert code == 0, err
    doc = json.loads(out)
    index = ChipsDataset(tmp_path / "c").index
    assert doc["chips"] == len(index) and doc["task"] == "classification"
    assert doc["chips"] + sum(doc["dropped"].values()) == 25
    assert sum(c["chips"] for c in doc["classes"]) == doc["chips"]
    assert [c["name"] for c in doc["classes"]][:2] == ["cultivated_land", "forest"]
    assert len(doc["stats"]["mean"]) == 13 and doc["chip_size"] == 32


def test_scene_paths_can_come_from_stdin(tmp_path):
    paths = "\n".join(str(p) for p in sample.slovenia_scenes()) + "\n"
    code, out, err = run_cli(
        "tile", "-", "-o", str(tmp_path / "c"), "--size", "32", "--json", input=paths
    )
    assert code == 0, err
    assert json.loads(out)["num_frames"] == 5


def test_vector_labels_become_masks_and_the_field_values_class_names(tmp_path):
    code, _out, err = run_cli(
        "tile",
        SLOVENIA_0,
        "-o",
        str(tmp_path / "c"),
        "--size",
        "32",
        "--labels",
        LULC_GPKG,
        "--label-field",
        "LULC_NAME",
        "--json",
    )
    assert code == 0, err
    ds = ChipsDataset(tmp_path / "c")
    assert ds.task == "segmentation" and ds.has_masks
    assert {c["name"] for c in ds.classes} >= {"forest", "grassland"}


def test_labels_in_another_crs_are_reprojected_and_say_so(tmp_path):
    gpd.read_file(LULC_GPKG).to_crs("EPSG:4326").to_file(tmp_path / "lulc4326.gpkg")
    common = ["--size", "32", "--label-field", "LULC_NAME", "--val-fraction", "0"]
    code, _, err = run_cli(
        "tile",
        SLOVENIA_0,
        "-o",
        str(tmp_path / "a"),
        "--labels",
        str(tmp_path / "lulc4326.gpkg"),
        *common,
    )
    assert code == 0, err
    assert "reprojected from EPSG:4326 to EPSG:32633" in err
    assert (
        run_cli("tile", SLOVENIA_0, "-o", str(tmp_path / "b"), "--labels", LULC_GPKG, *common)[0]
        == 0
    )
    a, b = ChipsDataset(tmp_path / "a"), ChipsDataset(tmp_path / "b")
    agree = np.mean([(a.read_mask(i) == b.read_mask(i)).mean() for i in range(len(a))])
    assert agree > 0.98  # the same polygons, up to vertices moved by the round trip


def test_missing_label_field_lists_the_fields(tmp_path):
    code, _, err = run_cli("tile", SLOVENIA_0, "-o", str(tmp_path / "c"), "--labels", LULC_GPKG)
    assert code == 2
    assert "--label-field" in err and "LULC_NAME" in err and "RABA_ID" in err
    assert not (tmp_path / "c").exists()


def test_unknown_label_field_is_an_error_naming_it(tmp_path):
    code, _, err = run_cli(
        "tile",
        SLOVENIA_0,
        "-o",
        str(tmp_path / "c"),
        "--labels",
        LULC_GPKG,
        "--label-field",
        "crop",
    )
    assert code == 2 and "crop" in err and "LULC_NAME" in err


def test_labels_that_miss_the_scene_are_an_error_with_zero_chips(tmp_path):
    code, _, err = run_cli(
        "tile",
        str(sample.s2_tile_crop()),
        "-o",
        str(tmp_path / "c"),
        "--labels",
        LULC_GPKG,
        "--label-field",
        "LULC_NAME",
    )
    assert code == 2
    assert "do not overlap" in err and "LULC.gpkg" in err
    assert not (tmp_path / "c").exists()


def test_an_existing_output_needs_overwrite(tmp_path):
    args = ["tile", SLOVENIA_0, "-o", str(tmp_path / "c"), "--size", "32"]
    assert run_cli(*args)[0] == 0
    code, _, err = run_cli(*args)
    assert code == 2 and "--overwrite" in err
    assert run_cli(*args, "--overwrite")[0] == 0


def test_a_corrupt_file_is_named_and_skipped_with_skip_bad(tmp_path):
    broken = tmp_path / "broken_2015-08-01.tif"
    broken.write_bytes(b"II*\x00" + b"\x00garbage" * 50)
    code, _, err = run_cli(
        "tile", SLOVENIA_0, str(broken), "-o", str(tmp_path / "c"), "--size", "32"
    )
    assert code == 2 and "broken_2015-08-01.tif" in err
    assert not (tmp_path / "c").exists()
    code, out, err = run_cli(
        "tile",
        SLOVENIA_0,
        str(broken),
        "-o",
        str(tmp_path / "c"),
        "--size",
        "32",
        "--skip-bad",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["skipped_files"] == [str(broken)]
    assert "broken_2015-08-01.tif" in err


def test_scenes_in_different_crss_are_reprojected_to_the_first(shared_data, tmp_path):
    root = shared_data / "bigearthnet-s2-examples"
    zone33 = root / "S2A_MSIL2A_20170613T101031_87_48"
    zone35 = root / "S2B_MSIL2A_20170924T93020_69_24"
    code, _out, err = run_cli(
        "tile",
        str(zone33),
        str(zone35),
        "-o",
        str(tmp_path / "c"),
        "--size",
        "60",
        "--val-fraction",
        "0",
        "--json",
    )
    assert code == 0, err
    assert "reprojecting" in err and "EPSG:32633" in err
    index = ChipsDataset(tmp_path / "c").index
    assert (index["crs"] == "EPSG:32633").all() and index.crs.to_epsg() == 32633
    assert index["source"].str.contains("69_24").any()
    assert index["source"].str.contains("87_48").any()


def test_class_folders_import_patches_with_folder_names_as_classes(tmp_path):
    root = tmp_path / "patches"
    with rasterio.open(SLOVENIA_0) as src:  # real 16 px crops, filed by their LULC majority
        profile = src.profile | {"width": 16, "height": 16}
        for k, (row, col) in enumerate([(0, 0), (0, 16), (16, 0), (48, 48), (64, 64), (80, 80)]):
            cls = "forest" if k < 3 else "grassland"
            (root / cls).mkdir(parents=True, exist_ok=True)
            window = Window(col, row, 16, 16)
            with rasterio.open(
                root / cls / f"p{k}.tif",
                "w",
                **profile | {"transform": src.window_transform(window)},
            ) as dst:
                dst.write(src.read(window=window))
                dst.descriptions = src.descriptions
    code, _out, err = run_cli(
        "tile",
        str(root),
        "--class-folders",
        "-o",
        str(tmp_path / "c"),
        "--val-fraction",
        "0.34",
        "--json",
    )
    assert code == 0, err
    ds = ChipsDataset(tmp_path / "c")
    assert [c["name"] for c in ds.classes] == ["forest", "grassland"]
    assert ds.chip_size == 16 and len(ds) == 6 and ds.task == "classification"
    for _, row in ds.index.iterrows():
        assert ds.classes[row.label]["name"] in row.source
    assert (ds.index.groupby("label")["split"].apply(lambda s: (s == "val").sum()) == 1).all()


def test_an_empty_class_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / "patches" / "forest").mkdir(parents=True)
    (tmp_path / "patches" / "water").mkdir()
    with (
        rasterio.open(SLOVENIA_0) as src,
        rasterio.open(
            tmp_path / "patches" / "forest" / "a.tif",
            "w",
            **src.profile | {"width": 8, "height": 8},
        ) as dst,
    ):
        dst.write(src.read(window=Window(0, 0, 8, 8)))
    code, _, err = run_cli(
        "tile", str(tmp_path / "patches"), "--class-folders", "-o", str(tmp_path / "c")
    )
    assert code == 2 and "water" in err and "no raster" in err


def test_dry_run_plans_the_chips_a_real_run_writes_and_writes_nothing(tmp_path):
    args = [
        "tile",
        SLOVENIA_0,
        "-o",
        str(tmp_path / "c"),
        "--size",
        "32",
        "--label-raster",
        str(sample.slovenia_labels()),
        "--val-fraction",
        "0.2",
        "--split-block",
        "32",
    ]
    code, out, err = run_cli(*args, "--dry-run", "--json")
    assert code == 0, err
    assert list(tmp_path.iterdir()) == []
    planned = json.loads(out)
    plan = planned["plan"]
    assert (plan["candidates"], plan["to_read"], plan["split_block_px"]) == (9, 9, 32)
    assert plan["disk_bytes_at_most"] == 9 * (13 * 4 + 1) * 32 * 32
    assert (plan["scenes"][0]["width"], plan["scenes"][0]["height"]) == (100, 101)
    code, out, err = run_cli(*args, "--json")
    written = json.loads(out)
    assert written["plan"] is None
    assert written["chips"] == planned["chips"] == 9 and written["splits"] == planned["splits"]
    assert [c["name"] for c in written["classes"]] == [c["name"] for c in planned["classes"]]


def test_dry_run_text_names_chips_blocks_disk_and_memory(tmp_path):
    code, out, err = run_cli(
        "tile", SLOVENIA_0, "-o", str(tmp_path / "c"), "--size", "32", "--dry-run"
    )
    assert code == 0, err
    assert "would write at most 9 chips" in out and "read blocks" in out
    assert "at most 479.2 kB on disk" in out  # 9 chips x 13 bands x 4 bytes x 32 x 32
    assert f"  scene 1: 100 x 101 px (2015-07-11): {Path(SLOVENIA_0).name}" in out
    assert not (tmp_path / "c").exists()


def test_gridding_options_are_refused_with_class_folders(tmp_path):
    (tmp_path / "patches" / "forest").mkdir(parents=True)
    code, _, err = run_cli(
        "tile",
        str(tmp_path / "patches"),
        "--class-folders",
        "-o",
        str(tmp_path / "c"),
        "--crs",
        "EPSG:4326",
        "--stride",
        "8",
    )
    assert code == 2 and "--crs, --stride: not for --class-folders" in err
    assert not (tmp_path / "c").exists()


def test_split_fractions_summing_to_one_are_refused_for_class_folders(tmp_path):
    code, _, err = run_cli(
        "tile",
        str(tmp_path),
        "--class-folders",
        "-o",
        str(tmp_path / "c"),
        "--val-fraction",
        "0.7",
        "--test-fraction",
        "0.6",
    )
    assert code == 2 and "sum to less than 1" in err


def test_a_dry_run_that_would_write_nothing_fails_as_the_run_would(tmp_path):
    code, out, err = run_cli("tile", SLOVENIA_0, "-o", str(tmp_path / "c"), "--dry-run")
    assert code == 2 and "no chip fits the scenes" in err and out == ""
