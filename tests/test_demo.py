"""``geoexplora demo``: the whole pipeline on the bundled sample, into one folder.

One tiny run (3 adapt, 3 fine-tuning, 20 probe steps) is shared by the tests. The probe's grid
(10 learning rates x 4 feature sets, two models) would still dominate the run on 2 cores, so the
run also shrinks that grid, and only that, by handing the demo a ProbeConfig with smaller
defaults.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
from conftest import run_cli

from geoexplora.sample import slovenia_scenes

BANDS = ["B2", "B3", "B4", "B8"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tree(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``folder``: relative path -> (size, mtime_ns, bytes)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small_probe():
    """The demo's probe with one learning rate, one feature set and 20 steps."""
    from geoexplora.pipelines import probe

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            probe,
            "ProbeConfig",
            functools.partial(probe.ProbeConfig, learning_rates=(0.01,), features=("cls",)),
        )
        yield


@pytest.fixture(scope="module")
def demo(tmp_path_factory, small_probe):
    """(exit code, stdout, stderr, output folder) of the tiny demo run."""
    out = tmp_path_factory.mktemp("demo") / "demo-out"
    code, stdout, stderr = run_cli(
        "demo",
        "--out",
        str(out),
        "--adapt-steps",
        "3",
        "--finetune-steps",
        "3",
        "--probe-steps",
        "20",
        "--device",
        "cpu",
        "--json",
    )
    return code, stdout, stderr, out


@pytest.fixture(scope="module")
def doc(demo):
    code, stdout, stderr, _ = demo
    assert code == 0, stderr
    return json.loads(stdout)


def numbers(value):
    """Every number in a JSON document."""
    if isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_demo_prints_one_json_summary_of_every_step(doc, demo):
    out = demo[3]
    assert doc["output"] == str(out)
    assert doc["adapt"]["steps"] == 3
    assert [m["name"] for m in doc["probe"]["models"]] == ["source", "adapted"]
    assert doc["finetune"]["path"] == str(out / "model.pt")
    assert doc["predict"]["valid_pixels"] == 100 * 101  # the labelled scene has no nodata
    assert set(doc["seconds"]) == {
        "tile",
        "source model",
        "adapt",
        "probe",
        "finetune",
        "predict",
        "quicklook",
    }


def test_demo_writes_every_output_into_the_folder(demo):
    out = demo[3]
    for name in (
        "chips/dataset.json",
        "chips/index.parquet",
        "source.pt",
        "adapted.pt",
        "adapted.loss.png",
        "model.pt",
        "prediction.tif",
        "prediction.tif.json",
        "quicklook.png",
        "summary.json",
    ):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".*partial"))  # the temporary folder was renamed


def test_demo_chips_are_a_segmentation_dataset_of_the_demo_bands(demo):
    meta = json.loads((demo[3] / "chips" / "dataset.json").read_text())
    assert meta["task"] == "segmentation" and meta["chip_size"] == 28
    assert [b["key"] for b in meta["bands"]] == [f"sentinel2:{b}" for b in BANDS]
    assert meta["units"] == "reflectance_x10000"


def test_demo_task_model_carries_the_chips_classes(demo):
    from geoexplora.models.file import read_model_meta

    out = demo[3]
    meta = read_model_meta(out / "model.pt")
    chips = json.loads((out / "chips" / "dataset.json").read_text())
    assert meta["task"]["task"] == "segmentation"
    assert [c["name"] for c in meta["task"]["classes"]] == [c["name"] for c in chips["classes"]]


def test_demo_prediction_is_a_cog_on_the_scenes_grid(demo):
    import numpy as np
    import rasterio

    scene = next(p for p in slovenia_scenes() if "2015-07-11" in p.name)
    with rasterio.open(demo[3] / "prediction.tif") as pred, rasterio.open(scene) as src:
        assert pred.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert pred.crs == src.crs and pred.transform == src.transform
        assert (pred.width, pred.height) == (src.width, src.height) == (100, 101)
        classes = json.loads(pred.tags()["CLASSES"])
        values = set(np.unique(pred.read(1)).tolist())
    assert values <= {c["id"] for c in classes}  # every pixel valid and a known class


@pytest.mark.parametrize("name", ["quicklook.png", "adapted.loss.png"])
def test_demo_pictures_are_real_pngs(demo, name):
    from PIL import Image

    path = demo[3] / name
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_demo_summary_json_numbers_are_finite(demo, doc):
    summary = json.loads((demo[3] / "summary.json").read_text())
    values = list(numbers(summary))
    assert len(values) > 20 and all(math.isfinite(v) for v in values)
    assert summary["adapt"]["first_loss"] == doc["adapt"]["first_loss"]


def test_demo_summary_json_paths_name_files_in_the_output_folder(demo):
    out = demo[3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["output"] == str(out)
    assert summary["quicklook"] == str(out / "quicklook.png")


def test_demo_chips_have_a_val_split(doc):
    assert doc["chips"]["splits"].get("val", 0) > 0


def test_demo_again_without_overwrite_exits_2_leaving_the_first_run_untouched(demo):
    out = demo[3]
    before = tree(out.parent)
    code, stdout, stderr = run_cli(
        "demo", "--out", str(out), "--adapt-steps", "3", "--finetune-steps", "3", "--device", "cpu"
    )
    assert code == 2 and stdout == ""
    assert stderr == f"geoexplora: error: {out} exists; pass --overwrite to replace it\n"
    assert tree(out.parent) == before


def test_run_demo_refuses_an_existing_folder_before_any_work(tmp_path):
    from geoexplora.errors import UserError
    from geoexplora.pipelines.demo import DemoConfig, demo

    (tmp_path / "demo-out").mkdir()
    (tmp_path / "demo-out" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="demo-out exists; pass overwrite"):
        demo(DemoConfig(output=tmp_path / "demo-out", adapt_steps=1, finetune_steps=1))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["demo-out", "notes.txt"]


def test_demo_refuses_a_bad_step_count_up_front_naming_its_option(tmp_path, monkeypatch):
    from geoexplora.pipelines import adapt

    def must_not_run(cfg):
        raise AssertionError("adapt ran before the demo's options were checked")

    monkeypatch.setattr(adapt, "adapt", must_not_run)
    code, _, stderr = run_cli(
        "demo", "--out", str(tmp_path / "d"), "--adapt-steps", "1", "--finetune-steps", "0"
    )
    assert code == 2 and "--finetune-steps" in stderr
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_an_earlier_demo_folder(tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("not a demo output")
    code, stdout, stderr = run_cli("demo", "--out", str(tmp_path), "--overwrite")
    assert code == 2 and stdout == ""
    assert "not an earlier demo folder (no summary.json); refusing to replace it" in stderr
    assert precious.read_text() == "not a demo output"
