"""Source models as first-class inputs: the ``models`` listing and wrapped checkpoint layouts."""

from __future__ import annotations

import json

import pytest
import torch
from factories import TINY, s2, timm_model

from geoexplora.cli import main
from geoexplora.models import build_backbone
from geoexplora.models.registry import ARCHITECTURES


def test_models_json_lists_the_registry(capsys):
    assert main(["models", "--json"]) == 0
    entries = {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    assert list(entries) == list(ARCHITECTURES)
    vitl = entries["vit_large_patch14_dinov2"]
    # timm's ViT-L/14 DINOv2 (no head): 304.4M parameters at 518 px, 303.2M at 224 px.
    assert vitl["parameters"] == 303_227_904
    assert (vitl["patch_size"], vitl["embed_dim"], vitl["depth"], vitl["num_heads"]) == (
        14,
        1024,
        24,
        16,
    )
    assert vitl["family"] == "dinov2" and vitl["objective"] == "dinov2"
    assert vitl["weights"]["tag"] == "lvd142m"
    assert "hf-hub:timm/vit_large_patch14_dinov2.lvd142m" in vitl["weights"]["looked_for"]
    assert isinstance(vitl["weights"]["cached"], bool)
    assert entries["vit_small_patch14_reg4_dinov2"]["registers"] == 4
    mae = entries["vit_base_patch16_224"]
    assert (mae["family"], mae["objective"], mae["patch_size"]) == ("mae", "mae", 16)
    tiny = entries["geo_vit_tiny_patch14"]
    assert (tiny["embed_dim"], tiny["depth"]) == (64, 4)
    assert tiny["weights"] == {
        "tag": None,
        "needs": "--init-weights PATH (a checkpoint) or random",
        "looked_for": [],
        "cached": None,
    }


def test_models_table(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "vit_giant_patch14_dinov2" in out and "1134.8M" in out


@pytest.mark.parametrize("layout", ["plain", "module", "model", "lightning", "lightning_module"])
def test_wrapped_state_dicts_load_the_same_weights(tmp_path, layout):
    """Lightning ``{"state_dict": {"model.*"}}`` (as the ExPLoRA authors and TerraTorch publish),
    ``{"model": ...}`` and DDP ``module.`` all give the plain state dict's backbone."""
    ref = timm_model(TINY, seed=5)
    sd = ref.state_dict()
    wrapped = {
        "plain": sd,
        "module": {f"module.{k}": v for k, v in sd.items()},
        "model": {"model": sd, "epoch": 3},
        "lightning": {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3},
        "lightning_module": {"state_dict": {f"model.module.{k}": v for k, v in sd.items()}},
    }[layout]
    path = tmp_path / "ckpt.ckpt"
    torch.save(wrapped, path)
    vit = build_backbone(TINY, str(path), bands=s2("B4", "B3", "B2"), img_size=56).eval()
    loaded = vit.vit.state_dict()
    for key in (
        "cls_token",
        "pos_embed",
        "blocks.0.attn.qkv.weight",
        "blocks.3.mlp.fc2.bias",
        "norm.weight",
    ):
        assert torch.equal(loaded[key], sd[key]), key
