"""Model specs where the verbs read a model: `probe SOURCE adapted.pt chips/` (the paper's
comparison in one command), `finetune SOURCE chips/`, `embed SOURCE raster`. Tiny registry
models with --init-weights random or checkpoints the tests write; the bundled sample's chips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from factories import TINY, make_chips_dataset, timm_model, tiny_model_file

from geoexplora.models.file import load_model

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ("--steps", "60", "--learning-rates", "1e-2,0.1", "--features", "cls,cls+mean")
QUICK = ("--batch-size", "8", "--num-workers", "0", "--accelerator", "cpu")
BANDS = ("--bands", "B2,B3,B4,B8")


@pytest.fixture(scope="module")
def chips(tmp_path_factory):
    """Slovenia classification chips (13 bands, 28 px) and an "adapted" model file on them."""
    base = tmp_path_factory.mktemp("specs")
    root = make_chips_dataset(base, "classification", size=28)
    return root, tiny_model_file(base / "adapted.pt", root)


def probe_json(*args):
    code, out, err = run_cli("probe", *args, "--json", *FAST)
    assert code == 0, err
    return json.loads(out)


def test_probe_compares_a_source_spec_with_an_adapted_file_side_by_side(chips, tmp_path):
    root, adapted = chips
    doc = probe_json(
        TINY,
        str(adapted),
        str(root),
        "--init-weights",
        "random",
        *BANDS,
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    names = [m["name"] for m in doc["models"]]
    assert names == [TINY, "adapted"] and doc["models"][0]["model"] == TINY
    # The spec is the source exactly as export writes it on those bands with the chips'
    # statistics (same seed, same image size): probing the file gives the same numbers.
    source = tmp_path / "source.pt"
    code, _, err = run_cli(
        "export",
        TINY,
        "--init-weights",
        "random",
        *BANDS,
        "--stats-from",
        str(root),
        "--image-size",
        "28",
        "-o",
        str(source),
    )
    assert code == 0, err
    as_file = probe_json(str(source), str(root), "--no-cache")["models"][0]
    spec = doc["models"][0]
    for key in ("top1", "balanced_accuracy", "macro_f1", "knn_top1"):
        assert spec[key] == pytest.approx(as_file[key], abs=1e-6), key
    assert spec["chosen_head"]["features"] == as_file["chosen_head"]["features"]
    # A second run reads the spec's features from the cache (its identity is deterministic).
    again = probe_json(
        TINY,
        str(adapted),
        str(root),
        "--init-weights",
        "random",
        *BANDS,
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert [m["features_from_cache"] for m in again["models"]] == [True, True]
    assert again["models"][0]["top1"] == spec["top1"]


def test_probe_builds_a_spec_on_all_the_chips_bands_by_default(chips, tmp_path):
    root, _ = chips
    out = tmp_path / "head.pt"
    doc = probe_json(
        TINY, str(root), "--init-weights", "random", "--no-cache", "--save-head", str(out)
    )
    model = load_model(out)
    meta = json.loads((root / "dataset.json").read_text())
    assert [b.key for b in model.backbone.bands] == [b["key"] for b in meta["bands"]]
    assert model.meta["provenance"]["backbone_source"]["spec"] == TINY
    assert doc["models"][0]["saved_head"]["path"] == str(out)


def test_finetune_a_lightning_checkpoint_given_by_name(chips, tmp_path):
    root, _ = chips
    ckpt = tmp_path / "source.ckpt"
    sd = timm_model(TINY, seed=4).state_dict()
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 1}, ckpt)
    out = tmp_path / "m.pt"
    code, stdout, err = run_cli(
        "finetune",
        TINY,
        str(root),
        "-o",
        str(out),
        "--init-weights",
        str(ckpt),
        *BANDS,
        "--mode",
        "linear",
        "--steps",
        "6",
        "--json",
        *QUICK,
    )
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["model"] == TINY and doc["mode"] == "linear"
    model = load_model(out)
    assert [b.key for b in model.backbone.bands] == [
        "sentinel2:B2",
        "sentinel2:B3",
        "sentinel2:B4",
        "sentinel2:B8",
    ]
    # Linear mode trains the head only: the checkpoint's transformer is in the output as it was.
    vit = model.backbone.vit.state_dict()
    for key in ("blocks.0.attn.qkv.weight", "blocks.3.mlp.fc1.bias", "cls_token"):
        assert torch.equal(vit[key], sd[key]), key
    source = model.meta["provenance"]["backbone_source"]
    assert source["spec"] == TINY and source["init_weights"] == str(ckpt)
    assert len(source["init_weights_sha256"]) == 64


def test_finetune_a_random_source_with_lora(chips, tmp_path):
    root, _ = chips
    out = tmp_path / "m.pt"
    code, stdout, err = run_cli(
        "finetune",
        TINY,
        str(root),
        "-o",
        str(out),
        "--init-weights",
        "random",
        "--steps",
        "6",
        "--json",
        *QUICK,
    )
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["training"]["parameters"]["trainable"] < doc["training"]["parameters"]["total"]
    assert load_model(out).meta["task"]["task"] == "classification"


def test_embed_a_source_spec_on_a_raster(tmp_path, sample_data):
    from geoexplora import sample

    scene = sample.slovenia_scenes()[0]
    out = tmp_path / "emb.tif"
    code, _, err = run_cli(
        "embed",
        TINY,
        str(scene),
        "-o",
        str(out),
        "--init-weights",
        "random",
        "--bands",
        "B4,B8",
        "--json",
    )
    assert code == 0, err
    import rasterio

    with rasterio.open(out) as src:
        assert src.count == 64  # the tiny ViT's width
        tags = src.tags()
    provenance = (
        json.loads(tags["GEOEXPLORA_PROVENANCE"])
        if "GEOEXPLORA_PROVENANCE" in tags
        else json.loads((out.with_name(out.name + ".json")).read_text())
    )
    assert TINY in json.dumps(provenance)


@pytest.mark.parametrize(
    "args, message",
    [
        (["adapted.pt", "CHIPS", "--init-weights", "random"], "not to model files"),
        (["no_such_model", "CHIPS"], "unknown model name"),
        ([TINY, "CHIPS"], "no published weights here"),
        ([TINY, "CHIPS", "--init-weights", "random", "--bands", "B2,B99"], "B99: not in the chips"),
        (["raw.pth", "CHIPS"], "--init-weights raw.pth"),
    ],
)
def test_bad_models_exit_2_in_one_line(chips, tmp_path, monkeypatch, args, message):
    root, adapted = chips
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapted.pt").write_bytes(adapted.read_bytes())
    torch.save(timm_model(TINY).state_dict(), tmp_path / "raw.pth")
    args = [str(root) if a == "CHIPS" else a for a in args]
    code, out, err = run_cli("probe", *args, "--no-cache")
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and out == ""


def _checkpoint(layout: str, path):
    """A tiny source checkpoint in one of the published key layouts; (arch, file, timm keys)."""
    from factories import TINY_MAE, mae_decoder_state, to_meta_dinov2
    from safetensors.torch import save_file

    arch = TINY_MAE if layout.startswith("mae") else TINY
    sd = timm_model(arch, img_size=518 if layout == "meta_dinov2" else 224, seed=6).state_dict()
    if layout == "timm_safetensors":
        path = path.with_suffix(".safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return arch, path, sd
    payload = {
        "meta_dinov2": lambda: to_meta_dinov2(sd, reg_tokens=0),
        "mae_with_decoder": lambda: {"model": {**sd, **mae_decoder_state()}},
        "mae_encoder": lambda: {"model": sd},
        "lightning": lambda: {"state_dict": {f"model.{k}": v for k, v in sd.items()}},
        "ddp": lambda: {f"module.{k}": v for k, v in sd.items()},
    }[layout]()
    torch.save(payload, path)
    return arch, path, sd


@pytest.fixture(scope="module")
def chips32(tmp_path_factory):
    """32 px chips for the patch-16 (MAE-shaped) source."""
    return make_chips_dataset(tmp_path_factory.mktemp("specs32"), "classification", size=32)


@pytest.mark.parametrize(
    "layout",
    ["timm_safetensors", "meta_dinov2", "mae_with_decoder", "mae_encoder", "lightning", "ddp"],
)
def test_every_checkpoint_layout_through_every_verb(chips, chips32, tmp_path, layout):
    from geoexplora import sample

    arch, ckpt, sd = _checkpoint(layout, tmp_path / "source.pth")
    root = chips32 if layout.startswith("mae") else chips[0]
    spec = (arch, "--init-weights", str(ckpt), *BANDS)
    keys = ("blocks.1.attn.qkv.weight", "blocks.3.mlp.fc2.bias", "norm.weight")

    code, _, err = run_cli("export", *spec, "-o", str(tmp_path / "source.pt"))
    assert code == 0, err
    exported = load_model(tmp_path / "source.pt").vit.state_dict()
    assert all(torch.equal(exported[k], sd[k]) for k in keys)

    doc = probe_json(*spec, str(root), "--no-cache")
    assert doc["models"][0]["name"] == arch and 0 <= doc["models"][0]["top1"] <= 1

    out = tmp_path / "m.pt"
    code, _, err = run_cli(
        "finetune", *spec, str(root), "-o", str(out), "--mode", "linear", "--steps", "2", *QUICK
    )
    assert code == 0, err
    tuned = load_model(out).backbone.vit.state_dict()
    assert all(torch.equal(tuned[k], sd[k]) for k in keys)

    code, _, err = run_cli(
        "embed", *spec, str(sample.slovenia_scenes()[0]), "-o", str(tmp_path / "emb.tif")
    )
    assert code == 0, err


def _hf_cache(root: Path, repo: str, files: dict[str, bytes]) -> Path:
    """A Hugging Face cache holding one snapshot of ``repo`` (the layout huggingface_hub reads
    offline: refs/main -> snapshots/<revision>/<files>)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def test_an_hf_hub_spec_reads_the_repo_s_config_and_weights_from_the_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf
    from safetensors.torch import save

    sd = timm_model(TINY, img_size=224, seed=8).state_dict()
    weights = save({k: v.contiguous() for k, v in sd.items()})
    _hf_cache(
        tmp_path / "hf",
        "someorg/tiny-dino",
        {"config.json": json.dumps({"architecture": TINY}).encode(), "model.safetensors": weights},
    )
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    code, _, err = run_cli(
        "export", "hf-hub:someorg/tiny-dino", *BANDS, "-o", str(tmp_path / "source.pt")
    )
    assert code == 0, err
    exported = load_model(tmp_path / "source.pt").vit.state_dict()
    assert torch.equal(exported["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])

    code, _, err = run_cli(
        "export", "hf-hub:someorg/absent", *BANDS, "-o", str(tmp_path / "absent.pt")
    )
    line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and not (tmp_path / "absent.pt").exists()
    assert (
        line.startswith("geoexplora: error: ")
        and "hf-hub:someorg/absent: cannot get config.json of someorg/absent" in line
        and "hf download someorg/absent" in line
    )
    code, _, err = run_cli("export", "hf-hub:no-slash", *BANDS, "-o", str(tmp_path / "x.pt"))
    assert code == 2 and "not a Hugging Face repo; write hf-hub:ORG/NAME" in err
