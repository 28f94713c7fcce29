"""`geoexplora probe` end to end on real chips (Landsat-7 NC, Landsat-8 polygons, BigEarthNet,
the bundled Slovenia sample) with tiny random models."""

import json
import shutil

import geopandas as gpd
import pytest
import torch
from conftest import run_cli
from factories import (
    bigearthnet_chips,
    landsat8_polygon_chips,
    nc_landsat7_chips,
    tiny_model_file,
)

from geoexplora.io.chips import ChipsDataset
from geoexplora.pipelines.probe import ProbeConfig, probe

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ("--steps", "150", "--learning-rates", "1e-3,1e-2,0.1")


@pytest.fixture(scope="module")
def nc(shared_data, tmp_path_factory):
    """(chips, model) for the Landsat-7 NC classification chips."""
    base = tmp_path_factory.getbasetemp() / "datasets"
    chips = nc_landsat7_chips(base, shared_data)
    model = tiny_model_file(tmp_path_factory.mktemp("models") / "tiny.pt", chips)
    return chips, model


def probe_json(*args):
    code, out, err = run_cli("probe", *args, "--json", *FAST)
    assert code == 0, err
    return json.loads(out)


def test_json_reports_every_number_split_sizes_and_the_chosen_head(nc, tmp_path):
    chips, model = nc
    doc = probe_json(str(model), str(chips), "--cache-dir", str(tmp_path))
    m = doc["models"][0]
    for key in ("top1", "balanced_accuracy", "macro_f1", "knn_top1"):
        assert 0.0 <= m[key] <= 1.0
    sizes = {s: int((ChipsDataset(chips, s).labels >= 0).sum()) for s in ("train", "val", "test")}
    assert m["split_sizes"] == sizes and doc["evaluated_on"] == "test"
    assert sum(map(sum, m["confusion_matrix"])) == sizes["test"]
    assert len(m["confusion_matrix"]) == len(doc["classes"]) == 7
    assert set(m["per_class_f1"]) == set(doc["classes"])
    head = m["chosen_head"]
    assert (head["features"], head["base_lr"]) in {(g["features"], g["base_lr"]) for g in m["grid"]}
    assert head["val_top1"] == max(g["val_top1"] for g in m["grid"])
    assert len(m["grid"]) == 4 * 3  # every feature set x every learning rate
    assert head["lr"] == pytest.approx(head["base_lr"] * sizes["train"] / 256)


def test_features_are_cached_and_reused(nc, tmp_path):
    chips, model = nc
    first = probe_json(str(model), str(chips), "--cache-dir", str(tmp_path))
    assert len(list(tmp_path.glob("*.pt"))) == 3  # train, val, test
    second = probe_json(str(model), str(chips), "--cache-dir", str(tmp_path))
    assert not first["models"][0]["features_from_cache"]
    assert second["models"][0]["features_from_cache"]
    for key in ("top1", "knn_top1", "confusion_matrix", "chosen_head"):
        assert second["models"][0][key] == first["models"][0][key]


def test_head_is_chosen_on_val_never_on_test(nc, tmp_path):
    """Scrambling the test labels changes the test scores, never the choice."""
    chips, model = nc
    scrambled = tmp_path / "scrambled"
    shutil.copytree(chips, scrambled)
    index = gpd.read_parquet(scrambled / "index.parquet")
    test = index["split"] == "test"
    index.loc[test, "label"] = (index.loc[test, "label"] + 3) % 7
    index.to_parquet(scrambled / "index.parquet", index=False)
    honest = probe_json(str(model), str(chips), "--no-cache")["models"][0]
    other = probe_json(str(model), str(scrambled), "--no-cache")["models"][0]
    assert other["grid"] == honest["grid"]
    assert other["chosen_head"] == honest["chosen_head"]
    assert other["confusion_matrix"] != honest["confusion_matrix"]


def test_several_models_print_side_by_side_with_confusion_plots(nc, tmp_path):
    chips, model = nc
    other = tiny_model_file(tmp_path / "other.pt", chips, seed=1)
    code, out, err = run_cli(
        "probe",
        str(model),
        str(other),
        str(chips),
        "--plots",
        str(tmp_path / "plots"),
        "--no-cache",
        *FAST,
    )
    assert code == 0, err
    header = next(line for line in out.splitlines() if "metric" in line)
    assert "tiny" in header and "other" in header
    for label in ("top-1", "balanced accuracy", "macro-F1", "k-NN top-1", "confusion matrix"):
        assert label in out
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["other.confusion.png", "tiny.confusion.png"]
    assert (tmp_path / "plots" / "tiny.confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_save_head_writes_a_task_model_that_reproduces_the_probe(nc, tmp_path):
    from geoexplora.models.file import load_model
    from geoexplora.train.features import ModelInputs

    chips, model = nc
    out = tmp_path / "head.pt"
    doc = probe_json(str(model), str(chips), "--no-cache", "--save-head", str(out))
    saved = load_model(out)
    assert saved.task == "classification"
    assert [c["name"] for c in saved.classes] == doc["classes"]
    assert saved.head.pooling == doc["models"][0]["saved_head"]["features"]
    # The saved model's own forward pass gives the test accuracy recorded in the file.
    test = ChipsDataset(chips, "test")
    items = [ModelInputs(test)[i] for i in range(len(test))]
    with torch.no_grad():
        logits = saved(torch.stack([it["image"] for it in items]))
    labels = torch.stack([it["label"] for it in items])
    accuracy = float((logits.argmax(1) == labels).double().mean())
    assert accuracy == pytest.approx(saved.meta["metrics"]["top1"], abs=1e-9)


def test_landsat8_polygons_probe_over_their_four_classes(shared_data, tmp_path):
    chips = landsat8_polygon_chips(tmp_path, shared_data)
    model = tiny_model_file(tmp_path / "tiny.pt", chips)
    doc = probe_json(str(model), str(chips), "--no-cache", "--features", "cls,cls+mean")
    assert doc["classes"] == ["crop", "developed", "tree", "water"]
    assert {g["features"] for g in doc["models"][0]["grid"]} == {"cls", "cls+mean"}


def test_multilabel_chips_get_per_class_sigmoids_and_map(shared_data, tmp_path):
    chips = bigearthnet_chips(tmp_path, shared_data)
    model = tiny_model_file(tmp_path / "tiny.pt", chips, arch="geo_vit_tiny_patch16")
    doc = probe_json(str(model), str(chips), "--no-cache")
    m = doc["models"][0]
    assert doc["task"] == "multilabel" and len(doc["classes"]) == 10
    assert "val_map" in m["chosen_head"] and "confusion_matrix" not in m
    for key in ("map", "macro_f1", "micro_f1", "knn_map", "top1", "knn_top1"):
        assert key in m
    assert set(m["per_class_ap"]) == set(doc["classes"])


def test_without_a_test_split_it_reports_on_val_and_says_so(sample_data, tmp_path):
    from factories import make_chips_dataset

    chips = make_chips_dataset(tmp_path, "classification")  # 32 px chips: patch 16
    model = tiny_model_file(tmp_path / "tiny.pt", chips, arch="geo_vit_tiny_patch16")
    doc = probe(ProbeConfig([model], chips, steps=20, learning_rates=(1e-2,))).report
    assert doc["evaluated_on"] == "val"
    assert any("no test split" in note for note in doc["notes"])
    assert doc["models"][0]["split_sizes"]["test"] == 0


def test_bad_inputs_exit_2_naming_the_problem(nc, tmp_path):
    chips, model = nc
    not_a_model = tmp_path / "x.pt"
    not_a_model.write_text("hello")
    cases = [
        ((str(not_a_model), str(chips)), "x.pt"),
        ((str(model), str(tmp_path)), "not a chips dataset"),
        ((str(model), str(chips), "--features", "cls,patch"), "--features"),
        ((str(chips),), "MODEL... CHIPS"),
        (
            (
                str(tiny_model_file(tmp_path / "p16.pt", chips, arch="geo_vit_tiny_patch16")),
                str(chips),
            ),
            "not a multiple of p16.pt's 16 px patches",
        ),
    ]
    for args, message in cases:
        code, out, err = run_cli("probe", *args, "--no-cache")
        assert code == 2 and message in err and out == "", (args, err)


def test_save_head_refuses_to_overwrite_before_any_work(nc, tmp_path):
    chips, model = nc
    out = tmp_path / "head.pt"
    out.write_bytes(b"keep")
    code, _, err = run_cli(
        "probe",
        str(model),
        str(chips),
        "--save-head",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert code == 2 and "--overwrite" in err
    assert out.read_bytes() == b"keep" and not (tmp_path / "cache").exists()
