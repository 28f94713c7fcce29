"""tile --append: new scenes join an existing chips dataset without touching what it holds.

The scenes are two overlapping halves of the bundled Sentinel-2 crop (real pixels): ``west``
(columns 0-159) and ``east`` (columns 96-255), cut on the crop's grid.
"""

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from conftest import run_cli
from rasterio.windows import Window

from geoexplora import sample
from geoexplora.errors import UserError
from geoexplora.io.chips import STATS_SAMPLE_NAME, ChipsDataset
from geoexplora.pipelines.tile import TileConfig, tile

SPLITS = {"val_fraction": 0.3, "split_block": 64}


def _cut(path, col0, width):
    with rasterio.open(sample.s2_tile_crop()) as src:
        window = Window(col0, 0, width, src.height)
        profile = src.profile | {"width": width, "transform": src.window_transform(window)}
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(src.read(window=window))
            dst.descriptions = src.descriptions
            dst.update_tags(**src.tags())
    return path


@pytest.fixture
def halves(tmp_path):
    (tmp_path / "scenes").mkdir()
    west = _cut(tmp_path / "scenes" / "S2A_29RKH_20200219_west.tif", 0, 160)
    east = _cut(tmp_path / "scenes" / "S2A_29RKH_20200219_east.tif", 96, 160)
    return west, east


def _tile(scenes, out, **kw):
    kw.setdefault("size", 32)
    return tile(TileConfig(inputs=[str(s) for s in scenes], output=out, progress=False, **kw))


def _snapshot(root):
    """Every file of a dataset folder with its bytes."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _polygons(path, scene, names):
    """One labelled polygon per name, side by side across the scene (written in EPSG:4326)."""
    with rasterio.open(scene) as src:
        west, south, east, north = src.bounds
        crs = src.crs
    step = (east - west) / len(names)
    boxes = [
        shapely.box(west + i * step, south, west + (i + 1) * step, north) for i in range(len(names))
    ]
    gdf = gpd.GeoDataFrame({"kind": names}, geometry=boxes, crs=crs).to_crs("EPSG:4326")
    gdf.to_file(path)
    return path


# --------------------------------------------------------------------------- what is kept


def test_append_adds_the_new_scenes_chips_and_leaves_the_old_ones_as_they_were(halves, tmp_path):
    west, east = halves
    first = _tile([west], tmp_path / "ds", **SPLITS)
    before = ChipsDataset(first.output).index.drop(columns="geometry")
    old_files = {k: v for k, v in _snapshot(first.output).items() if k.startswith("chips/")}

    second = _tile([east], tmp_path / "ds", append=True, **SPLITS)
    ds = ChipsDataset(second.output)
    assert second.appended and second.chips == 40 and second.dataset_chips == 40 + first.chips
    assert len(ds) == ds.meta["counts"]["chips"] == second.dataset_chips
    old = ds.index[ds.index.chip_id.isin(before.chip_id)].drop(columns="geometry")
    assert old.reset_index(drop=True).equals(before.reset_index(drop=True))
    after = _snapshot(second.output)
    assert all(after[k] == v for k, v in old_files.items())
    new = ds.index[~ds.index.chip_id.isin(before.chip_id)]
    assert new.source.str.endswith("east.tif").all() and new.chip_id.str.startswith("s001_").all()
    assert ds.meta["provenance"]["appended"][0]["sources"] == [str(east)]
    assert ds.meta["provenance"]["sources"] == [str(west), str(east)]


def test_new_chips_are_cut_on_their_own_scene_grid_and_read_back_as_its_pixels(halves, tmp_path):
    west, east = halves
    _tile([west], tmp_path / "ds", val_fraction=0)
    result = _tile([east], tmp_path / "ds", append=True, val_fraction=0)
    ds = ChipsDataset(result.output)
    with rasterio.open(east) as src:
        for i in np.flatnonzero(ds.index.source.str.endswith("east.tif").to_numpy())[::7]:
            row = ds.index.iloc[i]
            pixels = src.read(window=Window(row.col_off, row.row_off, 32, 32)).astype(np.float32)
            np.testing.assert_array_equal(
                ds.read_image(i)[0], np.where(pixels == 0, np.nan, pixels)
            )


def test_old_chips_are_linked_into_the_new_dataset_not_copied(halves, tmp_path):
    west, east = halves
    first = _tile([west], tmp_path / "ds", val_fraction=0)
    chip = first.output / ChipsDataset(first.output).index.path[0]
    inode = chip.stat().st_ino
    _tile([east], tmp_path / "ds", append=True, val_fraction=0)
    assert chip.stat().st_ino == inode


def test_statistics_after_append_match_one_run_over_both_scenes(halves, tmp_path):
    west, east = halves
    _tile([west], tmp_path / "ds", val_fraction=0)
    appended = _tile([east], tmp_path / "ds", append=True, val_fraction=0)
    together = _tile([west, east], tmp_path / "one", val_fraction=0)
    assert appended.dataset_chips == together.chips
    for key in ("mean", "std", "p2", "p98"):
        np.testing.assert_allclose(appended.stats[key], together.stats[key], rtol=0.03)
    stored = np.load(appended.output / STATS_SAMPLE_NAME)
    assert stored.shape[1] == 12 and 150_000 <= len(stored) <= 210_000


# --------------------------------------------------------------------------- splits and classes


def test_new_chips_join_the_split_of_old_chips_in_their_block_and_never_overlap_another(
    halves, tmp_path
):
    west, east = halves
    _tile([west], tmp_path / "ds", stride=16, **SPLITS)
    result = _tile([east], tmp_path / "ds", stride=16, append=True, **SPLITS)
    index = ChipsDataset(result.output).index
    old = index.source.str.endswith("west.tif")
    res = 200.0
    keys = [
        (int(np.floor(c.x / (64 * res))), int(np.floor(c.y / (64 * res))))
        for c in index.geometry.centroid
    ]
    index["block"] = keys
    old_split = index[old].groupby("block")["split"].agg(lambda s: s.mode()[0]).to_dict()
    shared = index[~old & index.block.isin(old_split)]
    assert len(shared) > 0
    assert (shared.split == shared.block.map(old_split)).all()
    shrunk = {
        s: shapely.union_all(index[index.split == s].geometry.buffer(-0.01))
        for s in ("train", "val")
    }
    assert not shrunk["train"].intersects(shrunk["val"])


def test_classes_are_matched_by_name_and_new_ones_get_the_next_ids(halves, tmp_path):
    west, east = halves
    old_labels = _polygons(tmp_path / "old.geojson", west, ["water", "forest"])
    new_labels = _polygons(tmp_path / "new.geojson", east, ["forest", "bare"])
    first = _tile([west], tmp_path / "ds", labels=old_labels, label_field="kind", val_fraction=0)
    assert [(c["id"], c["name"]) for c in first.classes] == [(0, "forest"), (1, "water")]
    result = _tile([east], tmp_path / "ds", labels=new_labels, append=True, val_fraction=0)
    ds = ChipsDataset(result.output)
    assert [(c["id"], c["name"]) for c in ds.meta["classes"]] == [
        (0, "forest"),
        (1, "water"),
        (2, "bare"),
    ]
    new = np.flatnonzero(ds.index.source.str.endswith("east.tif").to_numpy())
    seen = set()
    for i in new:
        seen |= set(np.unique(ds.read_mask(i)).tolist())
    assert seen <= {0, 2, 255} and {0, 2} <= seen  # forest kept id 0, bare is 2
    pixels = ds.meta["counts"]["class_pixels"]
    assert (
        pixels["bare"] > 0
        and pixels["water"] == {c["name"]: c["pixels"] for c in first.classes}["water"]
    )


def test_label_field_carries_over_from_the_dataset(halves, tmp_path):
    west, east = halves
    _tile(
        [west],
        tmp_path / "ds",
        labels=_polygons(tmp_path / "a.geojson", west, ["x"]),
        label_field="kind",
        val_fraction=0,
    )
    result = _tile(
        [east],
        tmp_path / "ds",
        append=True,
        val_fraction=0,
        labels=_polygons(tmp_path / "b.geojson", east, ["x"]),
    )
    assert result.chips == 40 and [c["name"] for c in result.classes] == ["x"]


# --------------------------------------------------------------------------- refusals


def test_a_scene_already_in_the_dataset_is_skipped_and_nothing_new_is_an_error(halves, tmp_path):
    west, east = halves
    _tile([west], tmp_path / "ds", val_fraction=0)
    with pytest.raises(UserError, match="nothing to append"):
        _tile([west], tmp_path / "ds", append=True, val_fraction=0)
    result = _tile([west, east], tmp_path / "ds", append=True, val_fraction=0)
    assert result.chips == 40


@pytest.mark.parametrize(
    "change, message",
    [
        ({"size": 16}, "size 16"),  # the Python API names the field
        ({"bands": ["B02", "B03", "B04"]}, "differ from"),
        ({"task": "segmentation"}, "task segmentation"),
        ({"crs": "EPSG:4326"}, "crs EPSG:4326"),
        ({"split_block": 32}, "split_block 32"),
    ],
)
def test_append_refuses_what_contradicts_the_dataset(halves, tmp_path, change, message):
    west, east = halves
    _tile([west], tmp_path / "ds", **SPLITS)
    before = _snapshot(tmp_path / "ds")
    with pytest.raises(UserError, match=message):
        _tile([east], tmp_path / "ds", append=True, val_fraction=0.3, **change)
    assert _snapshot(tmp_path / "ds") == before


def test_labels_are_required_to_append_to_a_labelled_dataset(halves, tmp_path):
    west, east = halves
    _tile(
        [west],
        tmp_path / "ds",
        val_fraction=0,
        labels=_polygons(tmp_path / "a.geojson", west, ["x"]),
        label_field="kind",
    )
    with pytest.raises(UserError, match="pass the labels"):
        _tile([east], tmp_path / "ds", append=True, val_fraction=0)


def test_labels_are_refused_for_a_dataset_without_labels(halves, tmp_path):
    west, east = halves
    _tile([west], tmp_path / "ds", val_fraction=0)
    with pytest.raises(UserError, match="has no labels"):
        _tile(
            [east],
            tmp_path / "ds",
            append=True,
            val_fraction=0,
            label_field="kind",
            labels=_polygons(tmp_path / "b.geojson", east, ["x"]),
        )


def test_a_scene_with_another_number_of_dates_is_refused(tmp_path):
    import shutil

    _tile(sample.slovenia_scenes(), tmp_path / "ds", val_fraction=0)
    one_date = shutil.copy(sample.slovenia_scenes()[0], tmp_path / "S2L1C_2015-10-01_13band.tif")
    with pytest.raises(UserError, match="1 date"):
        _tile([one_date], tmp_path / "ds", append=True, val_fraction=0)


def test_scenes_cannot_be_appended_to_a_class_folder_dataset(halves, tmp_path):
    root = _patches(tmp_path / "p", [("grass", "a"), ("urban", "b")])
    _tile([root], tmp_path / "ds", class_folders=True, size=None, val_fraction=0)
    with pytest.raises(UserError, match="made from class folders; pass class_folders"):
        _tile([halves[0]], tmp_path / "ds", append=True, val_fraction=0)


def test_parallel_workers_append_the_same_chips(halves, tmp_path):
    west, east = halves
    for name, workers in (("one", 1), ("two", 2)):
        _tile([west], tmp_path / name, **SPLITS)
        _tile([east], tmp_path / name, append=True, workers=workers, **SPLITS)
    a, b = ChipsDataset(tmp_path / "one"), ChipsDataset(tmp_path / "two")
    assert a.index.drop(columns="geometry").equals(b.index.drop(columns="geometry"))
    assert a.meta["stats"] == b.meta["stats"]


def test_an_interrupted_append_leaves_the_old_dataset_as_it_was(halves, tmp_path, request):
    west, east = halves
    _tile([west], tmp_path / "ds", **SPLITS)
    before = _snapshot(tmp_path / "ds")
    request.getfixturevalue("interrupt_fifth_chip")
    with pytest.raises(KeyboardInterrupt):
        _tile([east], tmp_path / "ds", append=True, **SPLITS)
    assert _snapshot(tmp_path / "ds") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "scenes"]


def test_append_to_a_missing_dataset_creates_it(halves, tmp_path):
    result = _tile([halves[0]], tmp_path / "ds", append=True, val_fraction=0)
    assert not result.appended and result.chips == result.dataset_chips == 40


# --------------------------------------------------------------------------- class folders


def _patches(root, names):
    with rasterio.open(sample.slovenia_scenes()[0]) as src:
        profile = src.profile | {"width": 16, "height": 16}
        for k, (cls, name) in enumerate(names):
            (root / cls).mkdir(parents=True, exist_ok=True)
            window = Window(16 * k, 16 * k, 16, 16)
            with rasterio.open(
                root / cls / f"{name}.tif",
                "w",
                **profile | {"transform": src.window_transform(window)},
            ) as dst:
                dst.write(src.read(window=window))
                dst.descriptions = src.descriptions
    return root


def test_class_folder_patches_append_with_known_classes_keeping_their_ids(tmp_path):
    root = _patches(tmp_path / "p", [("grass", "a"), ("grass", "b"), ("urban", "c")])
    _tile([root], tmp_path / "ds", class_folders=True, size=None, val_fraction=0)
    _patches(root, [("water", "d"), ("grass", "e")])
    result = _tile(
        [root], tmp_path / "ds", class_folders=True, size=None, val_fraction=0, append=True
    )
    ds = ChipsDataset(result.output)
    assert result.chips == 2 and len(ds) == 5
    assert [(c["id"], c["name"]) for c in ds.meta["classes"]] == [
        (0, "grass"),
        (1, "urban"),
        (2, "water"),
    ]
    labels = dict(zip(ds.index.source.map(lambda s: s.rsplit("/", 1)[1]), ds.index.label))
    assert labels == {"a.tif": 0, "b.tif": 0, "c.tif": 1, "d.tif": 2, "e.tif": 0}


# --------------------------------------------------------------------------- command line


def test_cli_append_reports_chips_added_and_in_all(halves, tmp_path):
    west, east = halves
    out = str(tmp_path / "ds")
    assert run_cli("tile", str(west), "-o", out, "--size", "32")[0] == 0
    code, stdout, err = run_cli("tile", str(east), "-o", out, "--append")
    assert code == 0, err
    assert "40 chips added, 80 in all" in stdout
    code, stdout, err = run_cli("tile", str(east), "-o", out, "--append", "--json")
    assert code == 2 and "nothing to append" in err and stdout == ""


def test_cli_append_and_overwrite_exclude_each_other(halves, tmp_path):
    code, _, err = run_cli(
        "tile", str(halves[0]), "-o", str(tmp_path / "ds"), "--append", "--overwrite"
    )
    assert code == 2 and "--append" in err and "--overwrite" in err
    assert not (tmp_path / "ds").exists()


def test_cli_existing_output_names_both_ways_on(halves, tmp_path):
    args = ["tile", str(halves[0]), "-o", str(tmp_path / "ds"), "--size", "32"]
    assert run_cli(*args)[0] == 0
    code, _, err = run_cli(*args)
    assert code == 2 and "--overwrite" in err and "--append" in err
    summary = json.loads(run_cli(*args[:-2], "--append", "--json", str(halves[1]))[1])
    assert summary["appended"] and summary["dataset_chips"] == 80


def test_dry_run_append_counts_old_and_new_chips_and_changes_nothing(halves, tmp_path):
    west, east = halves
    first = _tile([west], tmp_path / "ds", val_fraction=0)
    before = _snapshot(tmp_path / "ds")
    planned = _tile([east], tmp_path / "ds", append=True, val_fraction=0, dry_run=True)
    assert planned.appended and planned.plan["to_read"] == 40
    assert planned.dataset_chips == first.chips + 40
    assert _snapshot(tmp_path / "ds") == before


# --------------------------------------------------------------------------- review findings


def test_a_known_scene_named_from_another_folder_is_still_skipped(halves, tmp_path, monkeypatch):
    west, _east = halves
    _tile([west], tmp_path / "ds", val_fraction=0)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="nothing to append"):
        _tile(["../scenes/" + west.name], "../ds", append=True)


def test_a_new_date_of_a_known_place_in_a_batch_folder_is_appended(tmp_path):
    import shutil

    batch = tmp_path / "batch"
    batch.mkdir()
    shutil.copy(sample.slovenia_scenes()[0], batch)
    first = _tile([batch], tmp_path / "ds", val_fraction=0)
    shutil.copy(sample.slovenia_scenes()[1], batch)
    result = _tile([batch], tmp_path / "ds", append=True)
    assert result.chips == first.chips == 9
    assert result.already_in_dataset == [str(batch / sample.slovenia_scenes()[0].name)]
    assert ChipsDataset(result.output).index.dates.value_counts().to_dict() == {
        "2015-07-11": 9,
        "2015-07-31": 9,
    }


def test_reading_and_split_options_of_the_first_run_carry_over(halves, tmp_path):
    west, east = halves
    _tile(
        [west],
        tmp_path / "ds",
        resolution=400,
        val_fraction=0.25,
        test_fraction=0.25,
        split_block=64,
        max_nodata=0.2,
    )
    result = _tile([east], tmp_path / "ds", append=True, size=None)
    ds = ChipsDataset(result.output)
    new = ds.index[ds.index.source.str.endswith("east.tif")]
    assert {round(g.bounds[2] - g.bounds[0]) for g in new.geometry} == {32 * 400}
    assert {"val", "test"} <= set(new.split)
    config = ds.meta["provenance"]["appended"][0]["config"]
    assert (
        config["resolution"],
        config["val_fraction"],
        config["test_fraction"],
        config["max_nodata"],
    ) == (400, 0.25, 0.25, 0.2)
    with pytest.raises(UserError, match=r"resolution 200: .* was tiled at 400 m"):
        _tile([east], tmp_path / "ds", append=True, resolution=200)


def test_a_dataset_tiled_without_splits_gets_real_blocks_on_append(halves, tmp_path):
    west, east = halves
    first = _tile([west], tmp_path / "ds", val_fraction=0)
    assert ChipsDataset(first.output).meta["provenance"]["split_block_px"] is None
    result = _tile([east], tmp_path / "ds", append=True, val_fraction=0.3, split_block=64)
    ds = ChipsDataset(result.output)
    assert ds.meta["provenance"]["split_block_px"] == 64
    val = ds.index[ds.index.split == "val"]
    assert len(val) > 0 and len(val) % 4 == 0  # whole 2 x 2 chip blocks (stride = size)


def test_a_link_to_the_dataset_can_be_appended_to_and_stays_a_link(halves, tmp_path):
    west, east = halves
    _tile([west], tmp_path / "ds", val_fraction=0)
    (tmp_path / "link").symlink_to(tmp_path / "ds")
    result = _tile([east], tmp_path / "link", append=True)
    assert (tmp_path / "link").is_symlink() and len(ChipsDataset(tmp_path / "ds")) == 80
    assert result.dataset_chips == 80
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "link", "scenes"]


def test_a_carried_label_field_missing_from_new_labels_is_named_as_carried(halves, tmp_path):
    west, east = halves
    _tile(
        [west],
        tmp_path / "ds",
        val_fraction=0,
        label_field="kind",
        labels=_polygons(tmp_path / "a.geojson", west, ["x"]),
    )
    other = gpd.read_file(_polygons(tmp_path / "b.geojson", east, ["x"])).rename(
        columns={"kind": "type"}
    )
    other.to_file(tmp_path / "c.geojson")
    with pytest.raises(UserError, match=r"kind is the field .* was tiled with; pass label_field"):
        _tile([east], tmp_path / "ds", append=True, labels=tmp_path / "c.geojson")


def test_an_append_waits_for_another_append_to_the_same_dataset(halves, tmp_path):
    import subprocess
    import sys
    import time

    from geoexplora.io.outputs import exclusive

    west, east = halves
    _tile([west], tmp_path / "ds", val_fraction=0)
    code = "import sys; from geoexplora.cli import main; sys.exit(main(sys.argv[1:]))"
    log = tmp_path / "stderr.txt"
    with exclusive(tmp_path / "ds"), open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "tile", str(east), "-o", str(tmp_path / "ds"), "--append"],
            stderr=stderr,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while "waiting for it" not in " ".join(log.read_text().split()):
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.2)
        assert len(ChipsDataset(tmp_path / "ds")) == 40
    assert proc.wait(timeout=120) == 0, log.read_text()
    assert len(ChipsDataset(tmp_path / "ds")) == 80


def test_an_append_that_splits_nothing_leaves_the_block_size_open(halves, tmp_path):
    west, east = halves
    _tile([west], tmp_path / "ds", val_fraction=0)
    _tile([east], tmp_path / "ds", append=True, val_fraction=0)
    assert ChipsDataset(tmp_path / "ds").meta["provenance"]["split_block_px"] is None


def test_several_new_dates_of_a_known_place_are_one_date_scenes_each(tmp_path):
    import shutil

    batch = tmp_path / "batch"
    batch.mkdir()
    for scene in sample.slovenia_scenes()[:1]:
        shutil.copy(scene, batch)
    _tile([batch], tmp_path / "ds", val_fraction=0)
    for scene in sample.slovenia_scenes()[1:3]:
        shutil.copy(scene, batch)
    result = _tile([batch], tmp_path / "ds", append=True)
    ds = ChipsDataset(result.output)
    assert result.chips == 18 and ds.num_frames == 1
    assert sorted(ds.index.dates.unique()) == ["2015-07-11", "2015-07-31", "2015-08-20"]


def test_a_carried_fraction_that_no_longer_fits_is_named_as_carried(halves, tmp_path):
    west, east = halves
    _tile([west], tmp_path / "ds", val_fraction=0.2, test_fraction=0.3, split_block=64)
    with pytest.raises(UserError, match=r"--test-fraction from .*'s first run"):
        _tile([east], tmp_path / "ds", append=True, val_fraction=0.7)


def test_the_dataset_holding_the_current_folder_is_not_replaced(halves, tmp_path, monkeypatch):
    west, east = halves
    _tile([west], tmp_path / "ds", val_fraction=0)
    before = _snapshot(tmp_path / "ds")
    monkeypatch.chdir(tmp_path / "ds")
    with pytest.raises(UserError, match="holds the current folder"):
        _tile([east], ".", append=True)
    assert _snapshot(tmp_path / "ds") == before
