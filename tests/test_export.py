"""`geoexplora export`: any model spec as a geoexplora model file, or as ONNX checked with
onnxruntime against PyTorch. Tiny models only (random weights or checkpoints the tests write)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from factories import TINY, make_chips_dataset, make_model, s2, timm_model

from geoexplora.errors import RuntimeFailure, UserError
from geoexplora.models import build_backbone
from geoexplora.models.file import load_model
from geoexplora.pipelines.export import ExportConfig, export

pytestmark = pytest.mark.usefixtures("one_thread")
S2_4 = ["sentinel2:B2", "sentinel2:B3", "sentinel2:B4", "sentinel2:B8"]


def export_json(*args):
    code, out, err = run_cli("export", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_a_random_registry_source_becomes_a_model_file_that_reloads(tmp_path):
    out = tmp_path / "source.pt"
    doc = export_json(TINY, "--init-weights", "random", "--bands", "B2,B3,B4,B8", "-o", str(out))
    assert doc["bands"] == S2_4 and doc["kind"] == "backbone" and doc["format"] == "geoexplora"
    model = load_model(out)
    assert [b.key for b in model.bands] == S2_4
    # No data given: the bands' own fall-back statistics (Sentinel-2 L2A, canonical units).
    assert model.band_mean.tolist() == pytest.approx([b.mean for b in s2("B2", "B3", "B4", "B8")])
    assert model.meta["provenance"]["export"]["model"] == TINY
    assert model.meta["backbone"]["source"]["init_weights"] == "random"
    # The same seed builds the same weights: the file holds exactly the model export built.
    torch.manual_seed(0)
    ref = build_backbone(TINY, "random", bands=S2_4).eval()
    x = 1000 + 500 * torch.rand(2, 1, 4, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x)["cls"], ref(x)["cls"], atol=1e-6)


def test_a_checkpoint_with_chips_statistics_gets_the_band_aware_embedding(tmp_path):
    ckpt = tmp_path / "dinov2_tiny.pth"
    sd = timm_model(TINY, seed=3).state_dict()
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}}, ckpt)  # Lightning
    chips = make_chips_dataset(tmp_path, "classification", size=28)
    meta = json.loads((chips / "dataset.json").read_text())
    keys = [b["key"] for b in meta["bands"]]
    out = tmp_path / "source.pt"
    doc = export_json(
        TINY,
        "--init-weights",
        str(ckpt),
        "--stats-from",
        str(chips),
        "--bands",
        "B2,B3,B4,B8",
        "-o",
        str(out),
    )
    model = load_model(out)
    want = [keys.index(k) for k in S2_4]
    assert model.band_mean.tolist() == pytest.approx([meta["stats"]["mean"][i] for i in want])
    assert model.band_std.tolist() == pytest.approx([meta["stats"]["std"][i] for i in want])
    assert model.meta["backbone"]["stats"]["origin"] == "dataset.json"
    assert doc["stats"]["origin"] == "dataset.json"
    # The checkpoint's transformer weights are carried unchanged; only the embedding is new.
    loaded = model.vit.state_dict()
    for key in ("cls_token", "blocks.2.attn.qkv.weight", "norm.weight"):
        assert torch.equal(loaded[key], sd[key]), key
    assert model.vit.patch_embed.proj.num_groups == 1 and len(model.bands) == 4


def test_scenes_as_statistics_source(tmp_path, sample_data):
    from geoexplora import sample

    scene = sample.slovenia_scenes()[0]
    doc = export_json(
        TINY,
        "--init-weights",
        "random",
        "--bands",
        "B4,B8",
        "--stats-from",
        str(scene),
        "-o",
        str(tmp_path / "s.pt"),
    )
    assert doc["bands"] == ["sentinel2:B4", "sentinel2:B8"]
    assert doc["stats"]["origin"] == "data sample"
    model = load_model(tmp_path / "s.pt")
    assert model.meta["backbone"]["stats"]["from"] == [str(scene)]
    assert all(s > 0 for s in doc["stats"]["std"])


def test_a_task_model_file_keeps_its_head_when_re_exported(tmp_path):
    src = make_model(tmp_path / "m.pt", task="classification")
    out = tmp_path / "copy.pt"
    doc = export_json(str(src), "-o", str(out))
    assert doc["kind"] == "task" and doc["task"] == "classification"
    a, b = load_model(src), load_model(out)
    x = 1000 + 500 * torch.rand(2, 1, 4, 56, 56)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert b.meta["task"]["classes"] == a.meta["task"]["classes"]


def _ort(path, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_a_finetuned_model_to_onnx_matches_pytorch(tmp_path, task):
    src = make_model(tmp_path / "m.pt", task=task)
    out = tmp_path / "m.onnx"
    doc = export_json(str(src), "--format", "onnx", "-o", str(out))
    assert doc["check"]["max_abs_diff"] < 1e-4 and doc["check"]["passed"]
    assert doc["exporter"].startswith("torch.onnx.export(dynamo=")
    sidecar = json.loads((tmp_path / "m.onnx.json").read_text())
    assert sidecar["kind"] == "task" and sidecar["task"] == task
    assert [c["name"] for c in sidecar["classes"]] == ["water", "crop", "tree"]
    assert [b["key"] for b in sidecar["bands"]] == S2_4 and sidecar["patch_size"] == 14
    assert sidecar["inputs"][0]["shape"] == ["batch", 1, 4, 56, 56]
    assert len(sidecar["stats"]["mean"]) == 4 and sidecar["check"] == doc["check"]
    # An independent check on another batch size, with nodata (NaN) pixels.
    model = load_model(src)
    x = 1200 + 800 * torch.rand(3, 1, 4, 56, 56)
    x[0, 0, 2, :10, :10] = float("nan")
    (got,) = _ort(out, {"image": x})
    with torch.no_grad():
        ref = model(x).numpy()
    assert got.shape == ref.shape == ((3, 3, 56, 56) if task == "segmentation" else (3, 3))
    assert np.abs(got - ref).max() < 1e-4


def test_a_temporal_backbone_to_onnx_takes_dates_and_gives_cls_and_patch(tmp_path):
    src = make_model(tmp_path / "t.pt", task=None, frames=2)
    out = tmp_path / "t.onnx"
    doc = export_json(str(src), "--format", "onnx", "-o", str(out), "--image-size", "28")
    assert [i["name"] for i in doc["inputs"]] == ["image", "dates"]
    assert [o["name"] for o in doc["outputs"]] == ["cls", "patch"]
    model = load_model(src)
    x = 1000 + 900 * torch.rand(2, 2, 4, 28, 28)
    dates = torch.tensor([[18000.0, 18100.0], [18500.0, 18550.0]])
    cls, patch = _ort(out, {"image": x, "dates": dates})
    with torch.no_grad():
        ref = model(x, dates=dates)
    assert patch.shape == (2, 2, 4, 32)
    assert np.abs(cls - ref["cls"].numpy()).max() < 1e-4
    assert np.abs(patch - ref["patch"].numpy()).max() < 1e-4


def test_existing_outputs_are_refused_without_overwrite(tmp_path):
    src = make_model(tmp_path / "m.pt", task="classification")
    out = tmp_path / "m.onnx"
    export_json(str(src), "--format", "onnx", "-o", str(out))
    before = out.read_bytes()
    code, _, err = run_cli("export", str(src), "--format", "onnx", "-o", str(out))
    assert code == 2 and "exists; pass --overwrite" in err and len(err.splitlines()) == 1
    assert out.read_bytes() == before
    # The sidecar alone also blocks the run (it would be replaced).
    out.unlink()
    code, _, err = run_cli("export", str(src), "--format", "onnx", "-o", str(out))
    assert code == 2 and "m.onnx.json exists" in err and not out.exists()
    doc = export_json(str(src), "--format", "onnx", "-o", str(out), "--overwrite")
    assert doc["check"]["passed"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["not_a_model"], "unknown model name"),
        (["resnet18", "--init-weights", "random"], "not a ViT with a class token"),
        ([TINY], "no published weights here"),
        ([TINY, "--init-weights", "random", "--bands", "B2,B99"], "is not a sentinel2 band"),
        ([TINY, "--init-weights", "random", "--format", "tflite"], "format"),
        (["missing/model.pt"], "no such file"),
    ],
)
def test_bad_specs_exit_2_in_one_line_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "out.pt"
    code, stdout, err = run_cli("export", *args, "-o", str(out))
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_a_raw_checkpoint_as_the_spec_names_the_right_spelling(tmp_path):
    ckpt = tmp_path / "raw.pth"
    torch.save(timm_model(TINY).state_dict(), ckpt)
    code, _, err = run_cli("export", str(ckpt), "-o", str(tmp_path / "out.pt"))
    assert code == 2 and "--init-weights" in err and not (tmp_path / "out.pt").exists()


def test_what_onnx_cannot_express_is_a_user_error_with_nothing_written(tmp_path, monkeypatch):
    src = make_model(tmp_path / "m.pt", task="classification")

    def unsupported(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator foo")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    out = tmp_path / "m.onnx"
    with pytest.raises(UserError, match=r"ONNX cannot express this model.*operator foo"):
        export(ExportConfig(model=src, output=out, format="onnx"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_a_check_beyond_the_tolerance_fails_with_nothing_written(tmp_path):
    src = make_model(tmp_path / "m.pt", task="segmentation")
    out = tmp_path / "m.onnx"
    with pytest.raises(RuntimeFailure, match="differs from PyTorch's"):
        export(ExportConfig(model=src, output=out, format="onnx", atol=-1.0, rtol=0.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_a_sensor_alone_means_all_its_bands_and_rgb_needs_data_statistics(tmp_path):
    doc = export_json(
        TINY, "--init-weights", "random", "--sensor", "landsat8", "-o", str(tmp_path / "l8.pt")
    )
    from geoexplora.bands import SENSORS

    assert doc["bands"] == [b.key for b in SENSORS["landsat8"]]
    # Aerial RGB has no fall-back statistics: the error says where to get them, nothing written.
    code, _, err = run_cli(
        "export",
        TINY,
        "--init-weights",
        "random",
        "--sensor",
        "rgb",
        "-o",
        str(tmp_path / "rgb.pt"),
    )
    assert code == 2 and "no statistics for bands rgb:red" in err
    assert not (tmp_path / "rgb.pt").exists()


def test_the_output_may_not_be_the_input_model(tmp_path):
    src = make_model(tmp_path / "m.pt", task="classification")
    before = src.read_bytes()
    code, _, err = run_cli("export", str(src), "-o", str(src), "--overwrite")
    assert code == 2 and "is the input" in err
    assert src.read_bytes() == before
