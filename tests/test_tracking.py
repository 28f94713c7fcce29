"""--logger: adapt's training records reach Lightning's loggers, read back from their files."""

import csv

import pytest
import torch
from conftest import run_cli
from factories import TINY, timm_model

from geoexplora import sample


def _adapt(tmp_path, *args):
    weights = tmp_path / "tiny.pth"
    torch.save(timm_model(TINY, img_size=56).state_dict(), weights)
    return run_cli(
        "adapt",
        str(sample.slovenia_scenes()[0]),
        "-o",
        str(tmp_path / "adapted.pt"),
        "--init",
        TINY,
        "--init-weights",
        str(weights),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--crop-size",
        "56",
        "--num-workers",
        "0",
        "--bands",
        "B2,B3,B4,B8",
        "-q",
        "--log-dir",
        str(tmp_path / "runs"),
        *args,
    )


def _jsonl(tmp_path) -> list[dict]:
    import json

    return [json.loads(line) for line in (tmp_path / "adapted.log.jsonl").read_text().splitlines()]


def test_tensorboard_and_csv_get_every_logged_value_and_the_options(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, _, err = _adapt(
        tmp_path, "--logger", "tensorboard", "--logger", "csv", "--run-name", "trial"
    )
    assert code == 0, err
    records = _jsonl(tmp_path)
    assert records, "no training records"
    last = records[-1]

    (events_dir,) = {
        p.parent for p in (tmp_path / "runs" / "tensorboard" / "trial").rglob("events.out.*")
    }
    events = EventAccumulator(str(events_dir))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss", "lr", "images_per_s"} <= scalars
    assert {k for k in last if k != "step"} <= scalars  # every loss term and diagnostic
    (point,) = [e for e in events.Scalars("loss") if e.step == last["step"]]
    assert point.value == pytest.approx(last["loss"], rel=1e-6)

    assert events.Tags()["images"] == ["adapted.loss.png"]  # the loss curves, as an image
    (image,) = events.Images("adapted.loss.png")
    assert image.encoded_image_string.startswith(b"\x89PNG") and image.width > 100

    (metrics,) = (tmp_path / "runs" / "csv" / "trial").rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert float(rows[-1]["loss"]) == pytest.approx(last["loss"], rel=1e-6)
    (hparams,) = (tmp_path / "runs" / "csv" / "trial").rglob("hparams.yaml")
    assert "lora_rank: 64" in hparams.read_text() and "steps: 2" in hparams.read_text()


def test_an_unknown_or_missing_tracker_is_one_line_before_any_work(tmp_path, monkeypatch):
    code, _, err = _adapt(tmp_path, "--logger", "neptune")
    assert code == 2 and "--logger neptune: not one of csv, tensorboard, mlflow, wandb" in err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    code, _, err = _adapt(tmp_path, "--logger", "mlflow")
    assert code == 2 and "pip install 'geoexplora[mlflow]'" in err and err.count("\n") == 1
    assert not (tmp_path / "adapted.pt").exists()


def test_finetune_logs_validation_metrics_and_its_pngs_to_tensorboard(shared_data, tmp_path):
    pytest.importorskip("tensorboard")
    from factories import nc_landsat7_chips, tiny_model_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    chips = nc_landsat7_chips(tmp_path / "datasets", shared_data)
    model = tiny_model_file(tmp_path / "tiny.pt", chips)
    code, _, err = run_cli(
        "finetune",
        str(model),
        str(chips),
        "-o",
        str(tmp_path / "model.pt"),
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--batch-size",
        "8",
        "--num-workers",
        "0",
        "--accelerator",
        "cpu",
        "-q",
        "--logger",
        "tensorboard",
        "--log-dir",
        str(tmp_path / "runs"),
    )
    assert code == 0, err
    (events_dir,) = {
        p.parent for p in (tmp_path / "runs" / "tensorboard" / "model").rglob("events.out.*")
    }
    events = EventAccumulator(str(events_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("val_macro_f1")] == [2, 4]
    assert {"loss", "lr"} <= set(events.Tags()["scalars"])
    assert "model.loss.png" in events.Tags()["images"]


def test_mlflow_local_store_gets_metrics_options_and_pngs(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    code, _, err = _adapt(tmp_path, "--logger", "mlflow", "--run-name", "trial")
    assert code == 0, err
    last = _jsonl(tmp_path)[-1]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("geoexplora")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["mlflow.runName"] == "trial" and run.info.status == "FINISHED"
    assert run.data.params["lora_rank"] == "64" and run.data.params["steps"] == "2"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history][-1] == last["step"]
    assert history[-1].value == pytest.approx(last["loss"], rel=1e-6)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "images")] == [
        "images/adapted.loss.png"
    ]


def test_probe_logs_its_scores_table_and_confusion_pngs(shared_data, tmp_path):
    pytest.importorskip("tensorboard")
    from factories import nc_landsat7_chips, tiny_model_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    chips = nc_landsat7_chips(tmp_path / "datasets", shared_data)
    model = tiny_model_file(tmp_path / "tiny.pt", chips)
    code, out, err = run_cli(
        "probe",
        str(model),
        str(chips),
        "--steps",
        "20",
        "--no-cache",
        "--device",
        "cpu",
        "--json",
        "-q",
        "--plots",
        str(tmp_path / "plots"),
        "--logger",
        "tensorboard",
        "--logger",
        "csv",
        "--log-dir",
        str(tmp_path / "runs"),
    )
    assert code == 0, err
    import json

    (scores,) = json.loads(out)["models"]
    (events_dir,) = {
        p.parent for p in (tmp_path / "runs" / "tensorboard" / "probe").rglob("events.out.*")
    }
    events = EventAccumulator(str(events_dir))
    events.Reload()
    for key in ("top1", "macro_f1", "knn_top1", "knn_macro_f1"):
        (point,) = events.Scalars(f"probe/tiny/{key}")
        assert point.value == pytest.approx(scores[key], rel=1e-6)
    assert events.Tags()["images"] == ["tiny.confusion.png"]
    (metrics,) = (tmp_path / "runs" / "csv" / "probe").rglob("metrics.csv")
    (row,) = list(csv.DictReader(metrics.open()))
    assert float(row["probe/tiny/top1"]) == pytest.approx(scores["top1"], rel=1e-6)


def _wandb_records(run_file) -> list:
    """The records of a W&B offline run file: a LevelDB-style log (7-byte header, 32 KiB blocks,
    chunks of crc32/length/type) of protobuf ``Record``s, read back as ``wandb sync`` would."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw, block, pos = run_file.read_bytes(), 32768, 7
    chunks, records = b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if length == kind == 0:
            pos += block - pos % block
            continue
        chunks += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: one whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def test_wandb_offline_run_gets_every_logged_value_and_the_options(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import json

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    code, _, err = _adapt(tmp_path, "--logger", "wandb", "--run-name", "trial")
    assert code == 0, err
    last = _jsonl(tmp_path)[-1]
    (run_file,) = (tmp_path / "runs" / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(run_file)
    config = {
        item.key: json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
    }
    assert config["lora_rank"] == 64 and config["steps"] == 2
    history = [
        {
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in r.history.item
        }
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    losses = [h for h in history if "loss" in h]
    assert losses[-1]["loss"] == pytest.approx(last["loss"], rel=1e-6)
    assert losses[-1]["trainer/global_step"] == last["step"]
    assert {k for k in last if k != "step"} <= set().union(*history)
    (image,) = [h for h in history if "adapted.loss.png/_type" in h]
    assert image["adapted.loss.png/format"] == "png" and image["adapted.loss.png/width"] > 100


def test_tracked_verbs_show_the_tracker_options_in_their_own_help_panel():
    for verb in ("adapt", "finetune", "probe"):
        code, out, _ = run_cli(verb, "--help")
        assert code == 0
        panel = out[out.index("Experiment tracking") :]
        assert "--logger" in panel and "--run-name" in panel and "--log-dir" in panel
        assert "geoexplora[tensorboard]" in panel  # rich markup did not eat the extra's name
        assert "Run configuration" in out and out.count("--install-completion") == 0
    code, out, _ = run_cli("predict", "--help")
    assert code == 0 and "Experiment tracking" not in out and "--print-config" in out
