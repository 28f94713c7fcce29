"""`geoexplora finetune` end to end on real chips with tiny random models: Landsat-7 NC scene
classes, the Slovenia LULC time series and Sentinel-2 SCL classes per pixel, BigEarthNet
multi-label."""

import json

import pytest
from conftest import run_cli
from factories import (
    bigearthnet_chips,
    nc_landsat7_chips,
    tile_once,
    tiny_model_file,
)

from geoexplora.io.chips import ChipsDataset
from geoexplora.models.file import load_model

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = ("--batch-size", "8", "--num-workers", "0", "--accelerator", "cpu")


@pytest.fixture(scope="module")
def nc(shared_data, tmp_path_factory):
    base = tmp_path_factory.getbasetemp() / "datasets"
    chips = nc_landsat7_chips(base, shared_data)
    return chips, tiny_model_file(tmp_path_factory.mktemp("models") / "tiny.pt", chips)


@pytest.fixture(scope="module")
def nc_train_only(shared_data, tmp_path_factory):
    """NC chips with a train split only (half-overlapping chips): fine-tuning holds out a
    stratified 20 % of it for validation, so val follows the training distribution."""
    base = tmp_path_factory.getbasetemp() / "datasets"
    chips = nc_landsat7_chips(base, shared_data, stride=14, val_fraction=0.0, test_fraction=0.0)
    return chips, tiny_model_file(tmp_path_factory.mktemp("models") / "tiny.pt", chips)


@pytest.fixture(scope="module")
def nc_lora(nc_train_only, tmp_path_factory):
    """One lora fine-tune (the paper's default mode), shared by several tests."""
    chips, model = nc_train_only
    out = tmp_path_factory.mktemp("lora") / "model.pt"
    code, stdout, err = run_cli(
        "finetune",
        str(model),
        str(chips),
        "-o",
        str(out),
        "--steps",
        "24",
        "--eval-every",
        "6",
        "--lr",
        "3e-3",
        "--json",
        *QUICK,
    )
    assert code == 0, err
    return out, json.loads(stdout)


def test_training_loss_falls(nc_lora):
    out, _ = nc_lora
    log = [json.loads(line) for line in out.with_name("model.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log][-1] == 24
    first, last = sum(r["loss"] for r in log[:4]) / 4, sum(r["loss"] for r in log[-4:]) / 4
    assert last < first
    assert out.with_name("model.loss.png").read_bytes()[:4] == b"\x89PNG"


def test_fine_tuned_head_beats_the_untrained_head_on_val(nc_lora):
    _, doc = nc_lora
    metrics = doc["metrics"]
    assert metrics["monitor"] == "macro_f1"
    assert metrics["val"]["macro_f1"] > metrics["val_at_start"]["macro_f1"]
    assert metrics["best_step"] in [e["step"] for e in doc["evaluations"]]
    assert metrics["val"]["macro_f1"] == max(e["val_macro_f1"] for e in doc["evaluations"])


def test_output_carries_head_classes_colours_metrics_provenance_with_lora_merged(
    nc_train_only, nc_lora
):
    chips, model = nc_train_only
    out, doc = nc_lora
    task_model = load_model(out)
    meta = task_model.meta
    dataset = ChipsDataset(chips)
    assert task_model.task == "classification"
    assert task_model.classes == [
        {k: c[k] for k in ("id", "name", "color")} | ({"value": c["value"]} if "value" in c else {})
        for c in dataset.classes
    ]
    assert not any("lora_" in k for k in task_model.state_dict())
    assert meta["finetune"]["mode"] == "lora" and meta["finetune"]["lora_rank"] == 8
    assert meta["metrics"]["val"]["macro_f1"] == doc["metrics"]["val"]["macro_f1"]
    assert meta["provenance"]["data"]["chips"] == str(chips.resolve())
    assert meta["provenance"]["data"]["val_from_train"] is True
    assert meta["provenance"]["backbone_file"]["path"] == str(model.resolve())
    assert meta["backbone"]["finetune_lora"]["lora_targets"] == ["q", "v"]


def test_exported_weights_are_the_best_checkpoint(nc_train_only, nc_lora):
    """The file's forward pass reproduces the best validation score it reports."""
    from geoexplora.pipelines.finetune import EvalSet, evaluate, holdout_val, labelled_indices
    from geoexplora.train.features import ModelInputs

    chips, _ = nc_train_only
    out, doc = nc_lora
    train = ChipsDataset(chips, "train")
    _, val = holdout_val(train, labelled_indices(train, "classification"), "classification", 0.2, 0)
    assert doc["metrics"]["val"]["count"] == len(val)
    scores = evaluate(
        load_model(out), EvalSet(ModelInputs(train), val), "classification", 7, 16, "cpu"
    )
    assert scores["macro_f1"] == pytest.approx(doc["metrics"]["val"]["macro_f1"], abs=1e-6)
    assert doc["metrics"]["test"] is None  # no test split


def test_early_stopping_ends_the_run_when_val_stops_improving(nc, tmp_path):
    chips, model = nc
    code, stdout, err = run_cli(
        "finetune",
        str(model),
        str(chips),
        "-o",
        str(tmp_path / "m.pt"),
        "--steps",
        "40",
        "--eval-every",
        "2",
        "--patience",
        "1",
        "--lr",
        "1e-12",
        "--mode",
        "linear",
        "--json",
        *QUICK,
    )
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["training"]["early_stopped_at"] == 4  # first evaluation is the best, never beaten
    assert [e["step"] for e in doc["evaluations"]] == [2, 4]
    assert (tmp_path / "m.pt").is_file()


def test_temporal_segmentation_on_the_slovenia_series(sample_data, tmp_path):
    from factories import make_chips_dataset

    chips = make_chips_dataset(tmp_path, "temporal_segmentation")
    model = tiny_model_file(tmp_path / "tiny.pt", chips, arch="geo_vit_tiny_patch16")
    code, stdout, err = run_cli(
        "finetune",
        str(model),
        str(chips),
        "-o",
        str(tmp_path / "s.pt"),
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--mode",
        "full",
        "--json",
        *QUICK,
    )
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["task"] == "segmentation" and doc["metrics"]["monitor"] == "miou"
    val = doc["metrics"]["val"]
    assert set(val["per_class_iou"]) == set(doc["classes"])
    assert 0.0 <= val["miou"] <= 1.0
    saved = load_model(tmp_path / "s.pt")
    assert saved.backbone.num_frames == 5 and saved.head.config["type"] == "segmentation"
    image = ChipsDataset(chips, "train")[0]["image"]
    assert saved(image[None]).shape == (1, len(doc["classes"]), 32, 32)


def test_segmentation_of_sentinel2_scl_classes(sample_data, tmp_path):
    from geoexplora import sample

    chips = tile_once(
        tmp_path,
        "scl",
        inputs=[sample.s2_tile_crop()],
        label_raster=sample_data / "s2-29RKH" / "S2A_29RKH_20200219_SCL_crop.tif",
        task="segmentation",
        size=32,
        stride=32,
        val_fraction=0.25,
    )
    model = tiny_model_file(tmp_path / "tiny.pt", chips, arch="geo_vit_tiny_patch16")
    code, stdout, err = run_cli(
        "finetune",
        str(model),
        str(chips),
        "-o",
        str(tmp_path / "s.pt"),
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--json",
        *QUICK,
    )
    assert code == 0, err
    doc = json.loads(stdout)
    classes = [c["name"] for c in ChipsDataset(chips).classes]
    assert doc["classes"] == classes and len(classes) >= 2
    pixels = sum(map(sum, doc["metrics"]["val"]["confusion_matrix"]))
    assert pixels == doc["metrics"]["val"]["count"] > 0


def test_multilabel_on_bigearthnet(shared_data, tmp_path):
    chips = bigearthnet_chips(tmp_path, shared_data)
    model = tiny_model_file(tmp_path / "tiny.pt", chips, arch="geo_vit_tiny_patch16")
    code, stdout, err = run_cli(
        "finetune",
        str(model),
        str(chips),
        "-o",
        str(tmp_path / "m.pt"),
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--json",
        *QUICK,
    )
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["task"] == "multilabel" and doc["metrics"]["monitor"] == "map"
    assert set(doc["metrics"]["val"]["per_class_ap"]) == set(doc["classes"])
    assert load_model(tmp_path / "m.pt").task == "multilabel"


def test_bad_inputs_exit_2_and_write_nothing(nc, tmp_path, sample_data):
    from factories import make_chips_dataset

    chips, model = nc
    unlabelled = make_chips_dataset(tmp_path, "unlabeled")
    existing = tmp_path / "exists.pt"
    existing.write_bytes(b"keep")
    out = str(tmp_path / "out.pt")
    cases = [
        ((str(model), str(chips), "-o", out, "--steps", "2", "--epochs", "1"), "not both"),
        ((str(model), str(chips), "-o", out, "--mode", "half"), "--mode: must be one of"),
        ((str(model), str(chips), "-o", out, "--task", "segmentation"), "no masks"),
        ((str(model), str(unlabelled), "-o", out), "unlabelled"),
        ((str(model), str(chips), "-o", str(existing)), "--overwrite"),
    ]
    for args, message in cases:
        code, stdout, err = run_cli("finetune", *args, *QUICK)
        assert code == 2 and message in err and stdout == "", (args, err)
    assert existing.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.pt", "unlabeled"]
