"""The one input resolver: what a user names (files, folders, globs, '-') becomes the same scenes
under every verb that reads rasters (docs/concepts.md, "From inputs to scenes")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import run_cli

from geoexplora.errors import UserError
from geoexplora.io.inputs import SAME_PLACE_IOU, collect_inputs, place_name, resolve_places
from geoexplora.io.scene import SceneOptions

BANDS = ("B02", "B03", "B04")
ORIGINS = {"a": (500_000, 5_000_640), "b": (600_000, 5_100_640)}  # two places 100 km apart
DATES = ("20230301", "20230401")


def write_band(path: Path, origin: tuple[float, float], seed: int, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).integers(1000, 3000, (1, size, size), dtype="uint16")
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=size,
        height=size,
        count=1,
        dtype="uint16",
        crs="EPSG:32633",
        nodata=0,
        transform=rasterio.transform.from_origin(*origin, 10, 10),
    ) as dst:
        dst.write(data)
    return path


@pytest.fixture
def archive(tmp_path) -> Path:
    """Two places, each on two dates, each date a folder of per-band files (plus a preview that
    is not a band), filed by month then place: a place's dates live in different folders."""
    root = tmp_path / "archive"
    seed = 0
    for date in DATES:
        for place, origin in ORIGINS.items():
            for band in BANDS:
                seed += 1
                write_band(root / date[:6] / place / f"S2B_T33UVP_{date}_{band}.tif", origin, seed)
            write_band(root / date[:6] / place / "preview.tif", origin, 99)
    return root


def scene_files(groups) -> set[frozenset[str]]:
    """Scenes as sets of resolved file paths (what every verb must agree on)."""
    return {frozenset(str(Path(p).resolve()) for p in g) for g in groups}


def expected(root: Path) -> set[frozenset[str]]:
    return {
        frozenset(str(p.resolve()) for p in root.rglob(f"*/{place}/S2B_*.tif")) for place in ORIGINS
    }


def test_files_of_one_place_in_different_folders_are_one_scene(archive):
    places = resolve_places([archive])
    assert len(places) == 2
    assert scene_files(places.groups) == expected(archive)
    assert all(len(g) == len(DATES) * len(BANDS) for g in places.groups)  # previews left out


def test_the_same_folder_gives_the_same_scenes_under_every_verb(archive, tmp_path):
    from geoexplora.pipelines import adapt, info, predict, tile

    want = expected(archive)
    opts = SceneOptions()
    tiled, _, _ = tile.open_scenes(tile.TileConfig(inputs=[archive], output=tmp_path / "c"))
    assert scene_files(s.paths for s in tiled) == want
    assert [(len(s.dates), len(s.bands)) for s in tiled] == [(2, 3), (2, 3)]
    adapted = adapt.open_scenes([archive], opts)
    assert scene_files(s.paths for s in adapted) == want
    jobs = predict.plan_jobs([archive], f"{tmp_path}/out/", None)  # embed plans the same jobs
    assert scene_files(files for files, _ in jobs) == want
    assert sorted(out.name for _, out in jobs) == ["a.tif", "b.tif"]
    assert scene_files(info.describe([archive], opts)["scenes"]) == want


def test_a_glob_and_a_list_of_files_give_the_folder_s_scenes(archive):
    by_glob = resolve_places([str(archive / "**" / "S2B_*.tif")])
    files = sorted(archive.rglob("S2B_*.tif"), reverse=True)
    by_list = resolve_places([*files, files[0].resolve()])  # one file named twice is one input
    assert scene_files(by_glob.groups) == scene_files(by_list.groups) == expected(archive)


def test_scenes_keep_the_order_of_their_first_file(archive):
    b_first = sorted(archive.rglob("b/S2B_*.tif")) + sorted(archive.rglob("a/S2B_*.tif"))
    groups = resolve_places(b_first).groups
    assert [g[0].parent.name for g in groups] == ["b", "a"]
    assert list(groups[0]) == b_first[:6]


def test_footprints_overlapping_below_the_threshold_are_two_places(tmp_path):
    first = write_band(tmp_path / "x_B02.tif", (0, 640), 1)
    shift = 64 * 10 * 0.2  # 80% overlap along x: IoU = 0.8 / 1.2 = 0.67
    second = write_band(tmp_path / "y_B02.tif", (shift, 640), 2)
    assert 0.8 / 1.2 < SAME_PLACE_IOU
    assert len(resolve_places([first, second])) == 2
    nudged = write_band(tmp_path / "z_B02.tif", (10, 640), 3)  # one pixel: IoU 0.97
    assert len(resolve_places([first, nudged])) == 1


def test_place_names_for_outputs(archive):
    a_files = sorted((archive / "202303" / "a").glob("S2B_*.tif"))
    assert place_name(a_files) == "a"  # a folder of band files: the folder
    assert place_name(a_files[:1]) == a_files[0].stem  # one file: its stem
    spread = [a_files[0], next((archive / "202304" / "a").glob("S2B_*.tif"))]
    assert place_name(spread) == "a"  # folders of one name: that name
    mixed = [a_files[0], next((archive / "202304" / "b").glob("S2B_*.tif"))]
    assert place_name(mixed) == a_files[0].stem  # else the first file's stem


@pytest.mark.parametrize(
    "given,message",
    [
        ("missing.tif", "missing.tif: no such file or folder"),
        ("nothing-*.tif", "nothing-*.tif: the pattern matches no file"),
    ],
)
def test_bad_inputs_name_what_was_given(tmp_path, given, message):
    with pytest.raises(UserError, match=message.replace("*", r"\*")):
        collect_inputs([tmp_path / given])


def test_a_folder_without_rasters_is_named(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="empty: folder holds no raster files"):
        collect_inputs([tmp_path / "empty"])


def test_predict_refuses_two_places_into_one_file(archive, tmp_path):
    from geoexplora.pipelines.predict import plan_jobs

    with pytest.raises(UserError, match="the inputs are 2 places") as caught:
        plan_jobs([archive], tmp_path / "one.tif", None)
    assert caught.value.option == "output"


def test_info_lists_the_scenes_of_paths_read_from_stdin(archive):
    files = "\n".join(str(p) for p in sorted(archive.rglob("S2B_*.tif")))
    code, out, err = run_cli("info", "-", "--json", input=files + "\n")
    assert code == 0, err
    doc = json.loads(out)
    assert len(doc["files"]) == 12
    assert scene_files(doc["scenes"]) == expected(archive)
