"""The model file, task heads, model card and the scene check."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from factories import TINY, s2

from geoexplora.bands import get_band
from geoexplora.commands.info import render_model_card
from geoexplora.errors import UserError
from geoexplora.models import apply_explora, build_backbone
from geoexplora.models.file import (
    FORMAT_NAME,
    check_scene_against_model,
    load_model,
    model_card,
    read_model_meta,
    save_model,
)
from geoexplora.models.heads import TaskModel, build_head

CLASSES = [
    {"id": 1, "name": "crop", "color": "#e0c000"},
    {"id": 2, "name": "forest", "color": "#006400"},
    {"id": 3, "name": "water", "color": "#0040ff"},
]
BANDS = ("B2", "B3", "B4", "B8")


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return build_backbone(TINY, "random", bands=s2(*BANDS), img_size=56).eval()


def image(t=1, c=4, size=56, seed=0):
    torch.manual_seed(seed)
    return torch.rand(2, t, c, size, size) * 3000


def test_backbone_round_trip_is_exact_and_merged(tmp_path, backbone):
    apply_explora(backbone)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
        expect = backbone(image())
    path = save_model(tmp_path / "adapted.pt", backbone, {"provenance": {"data": "chips/"}})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT_NAME and raw["format_version"] == 1
    assert not any("lora" in k for k in raw["state_dict"])
    loaded = load_model(path)
    with torch.no_grad():
        got = loaded(image())
    assert (got["cls"] - expect["cls"]).abs().max() < 1e-5
    meta = loaded.meta
    assert [b["key"] for b in meta["backbone"]["bands"]] == [f"sentinel2:{b}" for b in BANDS]
    assert meta["backbone"]["bands"][0]["center_nm"] == 492.7
    assert meta["backbone"]["explora"]["lora_rank"] == 64
    assert meta["backbone"]["explora"]["parameters"]["trainable"] > 0
    assert meta["provenance"]["data"] == "chips/" and "torch" in meta["provenance"]["versions"]
    assert meta == read_model_meta(path)
    assert any("lora" in n for n, _ in backbone.named_parameters())  # caller's model untouched


def test_model_loads_without_peft(tmp_path, backbone):
    apply_explora(backbone)
    path = save_model(tmp_path / "adapted.pt", backbone)
    code = (
        "import sys; sys.modules['peft'] = None\n"
        "from geoexplora.models.file import load_model\n"
        f"m = load_model({str(path)!r})\n"
        "assert 'peft' not in [k for k, v in sys.modules.items() if v is not None]\n"
        "print(type(m).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "GeoViT"


@pytest.mark.parametrize(
    "task,pooling",
    [
        ("classification", "mean"),
        ("multilabel", "cls"),
        ("classification", "cls+mean"),
        ("classification", "cls4+mean"),
    ],
)
def test_task_model_classification_round_trip(tmp_path, backbone, task, pooling):
    head = build_head(task, backbone.embed_dim, len(CLASSES), pooling=pooling)
    model = TaskModel(backbone, head, task, CLASSES).eval()
    with torch.no_grad():
        logits = model(image())
    assert logits.shape == (2, 3)
    path = save_model(tmp_path / "task.pt", model)
    loaded = load_model(path)
    assert isinstance(loaded, TaskModel) and loaded.classes == CLASSES
    expected = {"type": "linear", "pooling": pooling, "num_classes": 3}
    if pooling.startswith("cls4"):
        expected["cls_blocks"] = 4
    assert loaded.head.config == expected
    with torch.no_grad():
        assert torch.allclose(loaded(image()), logits, atol=1e-6)
    assert loaded.meta["task"]["task"] == task


def test_segmentation_head_full_resolution_and_frames(tmp_path):
    vit = build_backbone(TINY, "random", bands=s2(*BANDS), img_size=56, num_frames=2).eval()
    model = TaskModel(
        vit, build_head("segmentation", vit.embed_dim, 3), "segmentation", CLASSES
    ).eval()
    x = image(t=2)
    mask = torch.tensor([[True, False], [True, True]])
    with torch.no_grad():
        logits = model(x, frame_mask=mask)
        assert logits.shape == (2, 3, 56, 56)
        x2 = x.clone()
        x2[0, 1] = 0  # a masked frame has no influence on its sample
        assert torch.allclose(model(x2, frame_mask=mask)[0], logits[0], atol=1e-5)
    path = save_model(tmp_path / "seg.pt", model)
    loaded = load_model(path)
    with torch.no_grad():
        assert torch.allclose(loaded(x, frame_mask=mask), logits, atol=1e-5)
    assert loaded.meta["backbone"]["num_frames"] == 2


def test_bad_files_are_user_errors(tmp_path, backbone):
    path = save_model(tmp_path / "m.pt", backbone)
    with pytest.raises(UserError, match="exists"):
        save_model(path, backbone)
    save_model(path, backbone, overwrite=True)

    raw = tmp_path / "raw.pth"
    torch.save(backbone.state_dict(), raw)
    with pytest.raises(UserError, match=r"raw.pth: not a geoexplora model file"):
        load_model(raw)

    newer = tmp_path / "newer.pt"
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, newer)
    with pytest.raises(UserError, match=r"newer.pt: model file format 99 is newer"):
        read_model_meta(newer)

    broken = tmp_path / "broken.pt"
    broken.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UserError, match=r"broken.pt: not a readable model file"):
        load_model(broken)

    with pytest.raises(UserError, match="no such model file"):
        load_model(tmp_path / "absent.pt")


def test_model_card_and_rendering(tmp_path, backbone):
    from rich.console import Console

    apply_explora(backbone)
    model = TaskModel(backbone, build_head("classification", 64, 3), "classification", CLASSES)
    path = save_model(tmp_path / "task.pt", model)
    card = model_card(path)
    json.dumps(card)
    assert len(card["sha256"]) == 64 and card["parameter_counts"]["head"] == 64 * 3 + 3
    assert card["parameter_counts"]["total"] > card["parameter_counts"]["head"]
    console = Console(record=True, width=140)
    console.print(render_model_card(card))
    text = console.export_text()
    assert "geo_vit_tiny_patch14" in text and "forest" in text and "B8" in text
    assert "explora" in text


def test_continue_adapting_from_model_file(tmp_path, backbone):
    path = save_model(tmp_path / "adapted.pt", backbone)
    same = build_backbone(str(path)).eval()
    with torch.no_grad():
        assert torch.equal(same(image())["cls"], backbone(image())["cls"])
    more = build_backbone(str(path), bands=s2("B2", "B3", "B4", "B8", "B11"), num_frames=2)
    assert [b.name for b in more.bands] == ["B2", "B3", "B4", "B8", "B11"]
    assert more.config["stats"]["mean"][:4] == backbone.config["stats"]["mean"]
    assert more.date_encoding is not None
    assert more(image(t=2, c=5))["cls"].shape == (2, 64)
    assert more.config["source"]["continued_from"] == str(path)
    with pytest.raises(UserError, match="spectral"):
        build_backbone(str(path), spectral_tokens="groups")


def _scene(keys, dates):
    return SimpleNamespace(
        bands=[get_band(*k.split(":")) for k in keys], dates=dates, crs="EPSG:32629"
    )


def test_scene_check_reorders_and_explains(tmp_path, backbone):
    meta = read_model_meta(save_model(tmp_path / "m.pt", backbone))
    scene = _scene(
        ["sentinel2:B8", "sentinel2:B4", "sentinel2:B11", "sentinel2:B3", "sentinel2:B2"],
        ["2020-02-19"],
    )
    plan = check_scene_against_model(meta, scene)
    assert plan.band_indices == [4, 3, 1, 0]
    assert [b.name for b in plan.bands] == list(BANDS) and plan.num_frames == 1
    with pytest.raises(UserError, match=r"lacks sentinel2:B8 .*has sentinel2:B2, sentinel2:B3"):
        check_scene_against_model(
            meta, _scene(["sentinel2:B2", "sentinel2:B3", "sentinel2:B4"], [None])
        )
    with pytest.raises(UserError, match="lacks sentinel2:B2"):
        check_scene_against_model(
            meta, _scene(["landsat8:B2", "landsat8:B3", "landsat8:B4", "landsat8:B5"], [None])
        )
    with pytest.raises(UserError, match="single date; the scene has 2"):
        check_scene_against_model(
            meta, _scene([f"sentinel2:{b}" for b in BANDS], ["2020-01-01", "2020-02-01"])
        )


def test_scene_check_temporal(tmp_path):
    vit = build_backbone(TINY, "random", bands=s2(*BANDS), img_size=56, num_frames=2)
    meta = read_model_meta(save_model(tmp_path / "t.pt", vit))
    keys = [f"sentinel2:{b}" for b in BANDS]
    plan = check_scene_against_model(meta, _scene(keys, ["2020-01-01", "2020-01-11"]))
    assert plan.days == [18262.0, 18272.0]
    with pytest.raises(UserError, match="takes 2 dates; the scene has 1"):
        check_scene_against_model(meta, _scene(keys, ["2020-01-01"]))
    with pytest.raises(UserError, match="pass dates"):
        check_scene_against_model(meta, _scene(keys, ["2020-01-01", None]))
