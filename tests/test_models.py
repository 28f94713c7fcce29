"""Backbones, weights, band-aware embedding, temporal encoding, normalisation, ExPLoRA."""

from __future__ import annotations

import math

import pytest
import torch
from factories import (
    TINY,
    TINY_MAE,
    TINY_REG,
    mae_decoder_state,
    s2,
    timm_model,
    to_meta_dinov2,
    zscore,
)
from safetensors.torch import save_file

from geoexplora.bands import get_band
from geoexplora.errors import UserError, cli_flag
from geoexplora.models import apply_explora, build_backbone, merge_lora, parameter_report
from geoexplora.models.registry import resolve_init
from geoexplora.models.spectral import mixing_matrix
from geoexplora.models.temporal import date_features, days_since_epoch

RGB = ("B4", "B3", "B2")


@pytest.fixture(scope="module")
def timm_ckpt(tmp_path_factory):
    """A tiny DINOv2-shaped timm ViT and its .safetensors file."""
    ref = timm_model(TINY)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return ref, path


def assert_close(a, b, tol=1e-5):
    err = (a - b).abs().max().item()
    assert err < tol, err
    return err


# --- --init parsing ---------------------------------------------------------------------------


def test_resolve_init_names_and_errors(tmp_path):
    spec = resolve_init("vit_small_patch14_dinov2.lvd142m")
    assert (spec.kind, spec.arch_name, spec.tag, spec.weights) == (
        "timm",
        "vit_small_patch14_dinov2",
        "lvd142m",
        "pretrained",
    )
    assert resolve_init("vit_large_patch14_reg4_dinov2", "random").weights == "random"
    assert resolve_init("vit_base_patch16_224.mae").tag == "mae"
    tg = resolve_init("torchgeo:ViTSmall16_Weights.SENTINEL2_ALL_DINO")
    assert (tg.kind, tg.torchgeo_enum) == ("torchgeo", "ViTSmall16_Weights.SENTINEL2_ALL_DINO")
    with pytest.raises(UserError, match="unknown model name"):
        resolve_init("not_a_model")
    with pytest.raises(UserError, match="no published weights"):
        resolve_init(TINY)
    with pytest.raises(UserError, match="no such file"):
        resolve_init(TINY, str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="no such file"):
        resolve_init(str(tmp_path / "model.pt"))
    model_file = tmp_path / "model.pt"
    model_file.write_bytes(b"x")
    assert resolve_init(str(model_file)).kind == "model_file"
    with pytest.raises(UserError, match="carries its own weights"):
        resolve_init(str(model_file), "random")


# --- weights in the real layouts -------------------------------------------------------------


def _equal_to_reference(vit, ref, bands, seed=0, size=56):
    torch.manual_seed(seed)
    x = torch.rand(2, len(bands), size, size) * 4000
    with torch.no_grad():
        ours = vit(x.unsqueeze(1))
        theirs = ref.forward_features(zscore(x, bands))
    n = ref.num_prefix_tokens
    assert_close(ours["cls"], theirs[:, 0])
    assert_close(ours["prefix"], theirs[:, :n])
    return assert_close(ours["patch"][:, 0], theirs[:, n:])


def test_timm_safetensors_loads_and_matches(timm_ckpt):
    ref, path = timm_ckpt
    vit = build_backbone(TINY, str(path), bands=s2(*RGB), img_size=56).eval()
    _equal_to_reference(vit, ref, s2(*RGB))
    assert vit.config["source"]["layout"] == "timm" and len(vit.config["source"]["sha256"]) == 64


@pytest.mark.parametrize("arch", [TINY, TINY_REG])
def test_meta_dinov2_checkpoint(tmp_path, arch):
    """Meta's .pth layout at 518 px (37x37 grid) loads like timm's own loader does, and its mask
    token is kept."""
    import timm

    src = timm_model(arch, img_size=518, seed=3)
    meta_sd = to_meta_dinov2(src.state_dict(), reg_tokens=src.num_reg_tokens)
    path = tmp_path / "dinov2_pretrain.pth"
    torch.save(meta_sd, path)
    vit = build_backbone(arch, str(path), bands=s2(*RGB), img_size=56).eval()
    from geoexplora.models.registry import ARCHITECTURES

    a = ARCHITECTURES[arch]
    ref = timm.create_model(
        a.timm_name,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path)},
        num_classes=0,
        img_size=56,
        dynamic_img_size=True,
        **a.overrides,
    ).eval()
    _equal_to_reference(vit, ref, s2(*RGB))
    assert torch.equal(vit.mask_token, meta_sd["mask_token"])
    assert vit.config["source"]["layout"] == "meta_dinov2" and vit.config["family"] == "dinov2"


@pytest.mark.parametrize("with_decoder", [True, False])
def test_mae_checkpoint(tmp_path, with_decoder):
    ref = timm_model(TINY_MAE, img_size=224)
    model = dict(ref.state_dict())
    if with_decoder:
        model.update(mae_decoder_state())
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": model}, path)
    vit = build_backbone(TINY_MAE, str(path), bands=s2(*RGB), img_size=224).eval()
    _equal_to_reference(vit, ref, s2(*RGB), size=64)
    assert vit.config["family"] == "mae"
    if with_decoder:
        assert set(vit.mae_decoder_state) == set(mae_decoder_state())
        assert vit.mae_decoder_state["mask_token"].shape == (1, 1, 32)
    else:
        assert vit.mae_decoder_state == {}


def test_checkpoint_errors(tmp_path, timm_ckpt):
    _, path = timm_ckpt
    with pytest.raises(UserError, match="does not fit this architecture"):
        build_backbone(TINY_MAE, str(path))
    pickled = tmp_path / "with_args.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": object.__new__(_Args)}, pickled)
    with pytest.raises(UserError, match="Python objects"):
        build_backbone(TINY, str(pickled))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable"):
        build_backbone(TINY, str(junk))


class _Args:
    pass


def test_offline_without_cache_names_the_file(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(UserError) as err:
        build_backbone("vit_small_patch14_dinov2.lvd142m", img_size=56)
    msg = str(err.value)
    assert "dinov2_vits14_pretrain.pth" in msg and "pass init_weights PATH" in msg
    assert "pass --init-weights PATH" in err.value.render(cli_flag)  # as the CLI prints it


def test_random_is_explicit():
    vit = build_backbone(TINY, "random", img_size=56)
    assert vit.config["source"]["weights"] == "random"


def test_torchgeo_enum_bands_and_normalisation(tmp_path, monkeypatch):
    """A torchgeo Sentinel-2 enum: its 13 bands and /10000 normalisation come along, and the
    model reproduces the source 13-channel ViT (given a local file in its layout)."""
    import timm

    overrides = {"depth": 2, "embed_dim": 64, "num_heads": 2}
    src = timm.create_model(
        "vit_small_patch16_224", num_classes=0, in_chans=13, dynamic_img_size=True, **overrides
    )
    from factories import randomise

    randomise(src).eval()
    path = tmp_path / "vit_small_patch16_224_sentinel2_all_dino.pth"
    torch.save(src.state_dict(), path)
    vit = build_backbone(
        "torchgeo:ViTSmall16_Weights.SENTINEL2_ALL_DINO",
        str(path),
        img_size=224,
        arch_overrides=overrides,
    ).eval()
    assert [b.name for b in vit.bands] == [
        "B1",
        "B2",
        "B3",
        "B4",
        "B5",
        "B6",
        "B7",
        "B8",
        "B8A",
        "B9",
        "B10",
        "B11",
        "B12",
    ]
    assert vit.config["stats"]["origin"] == "source"
    x = torch.rand(1, 13, 64, 64) * 5000
    with torch.no_grad():
        assert_close(vit(x.unsqueeze(1))["cls"], src.forward_features(x / 10000)[:, 0])

    # Offline and not cached: a UserError naming the file and the URL; nothing downloaded.
    torch.hub.set_dir(str(tmp_path / "hub"))

    def no_network(url, dst, progress=True):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(UserError, match=r"vit_small_patch16_224_sentinel2_all_dino-36bcc127.pth"):
        build_backbone("torchgeo:ViTSmall16_Weights.SENTINEL2_ALL_DINO", img_size=224)
    with pytest.raises(UserError, match="has no member"):
        build_backbone("torchgeo:ViTSmall16_Weights.NOPE")


# --- band-aware patch embedding --------------------------------------------------------------


def _read_s2_crop(shared_data, size=112):
    import rasterio

    path = shared_data / "s2-l2a-29RKH-2020-02-19" / "S2A_29RKH_20200219_L2A_12band_200m.tif"
    with rasterio.open(path) as ds:
        names = [d.replace("B0", "B") for d in ds.descriptions]
        data = ds.read(window=((200, 200 + size), (200, 200 + size))).astype("float32")
    return {n: torch.from_numpy(data[i]) for i, n in enumerate(names)}


def test_rgb_equivalence_on_real_sentinel2(shared_data, timm_ckpt):
    """On B4,B3,B2 the band-aware model computes what the RGB model computes on the same
    standardised image; other orders, and extra bands (zero-initialised), change nothing."""
    ref, path = timm_ckpt
    px = _read_s2_crop(shared_data)
    rgb = s2(*RGB)
    image = torch.stack([px[b.name] for b in rgb]).unsqueeze(0)  # (1, 3, H, W) canonical units
    with torch.no_grad():
        expect = ref.forward_features(zscore(image, rgb))
    errors = []
    for names in (RGB, ("B2", "B3", "B4"), ("B2", "B3", "B4", "B8", "B11")):
        bands = s2(*names)
        vit = build_backbone(TINY, str(path), bands=bands, img_size=56).eval()
        x = torch.stack([px[n] for n in names]).unsqueeze(0).unsqueeze(0)
        with torch.no_grad():
            out = vit(x)
        errors.append(assert_close(out["cls"], expect[:, 0]))
        assert_close(out["patch"][:, 0], expect[:, 1:])
    print(f"RGB-equivalence max abs error: {max(errors):.3g}")


def test_landsat_bands_interpolate_by_wavelength():
    l8_blue = get_band("landsat8", "B2")  # 482 nm, between S2 B1 (442.7) and B2 (492.7)
    row = mixing_matrix([l8_blue.center_nm])[0]
    assert row[1] == pytest.approx(0.795, abs=0.01) and row[0] == pytest.approx(0.205, abs=0.01)
    assert row.sum() == pytest.approx(1.0)
    vit = build_backbone(
        TINY,
        "random",
        bands=[get_band("landsat8", n) for n in ("B4", "B3", "B2", "B5")],
        img_size=56,
    )
    assert not vit.embedding_matches_source()
    assert vit(torch.rand(1, 1, 4, 56, 56) * 3000)["cls"].shape == (1, 64)
    aerial = build_backbone(
        TINY,
        "random",
        bands=[get_band("rgb", n) for n in ("R", "G", "B")],
        stats={"mean": [100, 100, 100], "std": [50, 50, 50]},
        img_size=56,
    )
    assert aerial.embedding_matches_source()  # generic RGB = the source's RGB


def test_bands_without_visible_neighbours(timm_ckpt):
    """No visible band: NIR/SWIR nodes start as the mean RGB kernel x 3/C, not zero."""
    _, path = timm_ckpt
    vit = build_backbone(TINY, str(path), bands=s2("B8", "B11", "B12"), img_size=56)
    source = build_backbone(TINY, str(path), bands=s2(*RGB), img_size=56)
    bank = vit.vit.patch_embed.proj.banks[0]
    src_bank = source.vit.patch_embed.proj.banks[0]
    mean_rgb = src_bank.kernels[[3, 2, 1]].mean(0)  # B4, B3, B2 nodes
    for node in (7, 11, 12):  # B8, B11, B12
        assert_close(bank.kernels[node], mean_rgb * 3 / 3, tol=1e-6)
    assert_close(bank.kernels[1], src_bank.kernels[1], tol=1e-6)  # visible nodes kept
    assert bank.kernels[0].abs().sum() > 0  # coastal takes the blue kernel
    # With a visible band present, new bands start at zero influence.
    mixed = build_backbone(TINY, str(path), bands=s2("B4", "B8"), img_size=56)
    assert mixed.vit.patch_embed.proj.banks[0].kernels[7].abs().sum() == 0


def test_spectral_group_tokens():
    names = ("B2", "B3", "B4", "B8", "B5", "B6", "B7", "B8A", "B11", "B12")
    vit = build_backbone(
        TINY, "random", bands=s2(*names), img_size=56, spectral_tokens="groups"
    ).eval()
    assert vit.config["spectral_groups"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    x = torch.rand(2, 1, len(names), 56, 56) * 3000
    tokens = vit.embed(x)
    assert tokens.shape == (2, 1 + 3 * 16, 64)
    out = vit(x)
    assert out["patch"].shape == (2, 1, 16, 64)
    assert not vit.embedding_matches_source()
    l8 = build_backbone(
        TINY,
        "random",
        bands=[get_band("landsat8", n) for n in ("B2", "B3", "B4", "B5", "B6", "B7")],
        img_size=56,
        spectral_tokens="groups",
    )
    assert l8.config["spectral_groups"] == [[0, 1, 2], [3], [4, 5]]
    with pytest.raises(UserError, match="no default spectral group"):
        build_backbone(TINY, "random", bands=s2("B1", "B2"), spectral_tokens="groups")


# --- normalisation ---------------------------------------------------------------------------


def test_normalisation_stats_and_nodata():
    bands = s2(*RGB)
    stats = {"mean": [1000.0, 1100.0, 1200.0], "std": [500.0, 400.0, 300.0]}
    vit = build_backbone(TINY, "random", bands=bands, stats=stats, img_size=56).eval()
    assert vit.config["stats"]["origin"] == "data"
    x = torch.full((1, 1, 3, 56, 56), 1500.0)
    z = vit.normalise(x)
    assert z[0, 0, :, 0, 0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    x_nan = x.clone()
    x_nan[0, 0, 1, :14, :14] = math.nan
    x_mean = x.clone()
    x_mean[0, 0, 1, :14, :14] = 1100.0
    with torch.no_grad():
        assert torch.equal(vit(x_nan)["cls"], vit(x_mean)["cls"])
    assert vit.normalise(x_nan).isfinite().all()
    fallback = build_backbone(TINY, "random", bands=bands, img_size=56)
    assert fallback.band_mean.tolist() == pytest.approx([b.mean for b in bands])
    with pytest.raises(UserError, match="no statistics"):
        build_backbone(TINY, "random", bands=[get_band("rgb", "red")])
    with pytest.raises(UserError, match="3 bands"):
        build_backbone(TINY, "random", bands=bands, stats={"mean": [1, 2], "std": [1, 2]})


# --- temporal --------------------------------------------------------------------------------


def test_dates_and_features():
    days = days_since_epoch(["1970-01-02", None, "2020-02-19T10:00:00"])
    assert days[0] == 1.0 and math.isnan(days[1]) and days[2] == 18311.0
    feats = date_features(torch.tensor([[18311.0, math.nan, 18311.0 + 365.2425]]))
    assert feats[0, 1].abs().sum() == 0  # unknown date: no signal
    assert_close(feats[0, 0, :4], feats[0, 2, :4], tol=1e-4)  # same day of year


def test_temporal_t1_equivalence_and_frame_mask(timm_ckpt):
    _, path = timm_ckpt
    bands = s2(*RGB)
    single = build_backbone(TINY, str(path), bands=bands, img_size=56).eval()
    multi = build_backbone(TINY, str(path), bands=bands, img_size=56, num_frames=3).eval()
    torch.manual_seed(0)
    x = torch.rand(2, 3, 3, 56, 56) * 4000
    days = torch.tensor([days_since_epoch(["2020-01-01", "2020-03-01", "2020-06-01"])] * 2)
    only_first = torch.tensor([[True, False, False]] * 2)
    with torch.no_grad():
        one = single(x[:, :1])
        masked = multi(x, dates=days, frame_mask=only_first)
        # gate 0: one valid frame is processed exactly as the single-date model does
        assert_close(masked["cls"], one["cls"])
        assert_close(masked["patch"][:, 0], one["patch"][:, 0])
        # masked frames are invisible: changing them changes nothing
        x2 = x.clone()
        x2[:, 1:] = torch.rand_like(x2[:, 1:]) * 4000
        assert_close(multi(x2, dates=days, frame_mask=only_first)["cls"], masked["cls"], tol=1e-6)
        # all frames attended: a different result; the date encoding starts silent
        full = multi(x, dates=days)
        assert (full["cls"] - one["cls"]).abs().max() > 1e-3
        assert torch.equal(multi(x)["cls"], full["cls"])
        multi.date_encoding.gate.fill_(1.0)
        assert (multi(x, dates=days)["cls"] - full["cls"]).abs().max() > 1e-4
    assert full["patch"].shape == (2, 3, 16, 64)
    with pytest.raises(ValueError, match="3 frame"):
        multi(x[:, :1])


# --- ExPLoRA ---------------------------------------------------------------------------------


def test_explora_freezing_and_qv_only(timm_ckpt):
    _, path = timm_ckpt
    vit = build_backbone(TINY, str(path), bands=s2(*RGB), img_size=56)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    torch.manual_seed(0)
    x = torch.rand(2, 1, 3, 56, 56) * 3000
    with torch.no_grad():
        out0 = vit.eval()(x)["cls"]
    report = apply_explora(vit)
    assert report["unfrozen_block_indices"] == [3]
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert all(n.startswith("vit.blocks.3.") for n in trainable if ".blocks.3." in n)
    assert all(p.requires_grad for n, p in vit.named_parameters() if n.startswith("vit.blocks.3."))
    assert "vit.cls_token" in trainable and "vit.norm.weight" in trainable
    assert "vit.blocks.0.norm1.weight" in trainable
    assert not any("patch_embed" in n or "pos_embed" in n or "mask_token" in n for n in trainable)
    attn = vit.vit.blocks[0].attn.qkv
    assert hasattr(attn.q, "lora_A") and hasattr(attn.v, "lora_A") and not hasattr(attn.k, "lora_A")
    lora = [n for n in trainable if "lora_" in n]
    assert len(lora) == 3 * 2 * 2  # 3 LoRA blocks x (q, v) x (A, B)
    assert not any(".blocks.3." in n for n in lora)
    assert attn.q.lora_A["default"].weight.shape == (64, 64)
    assert attn.q.scaling["default"] == pytest.approx(1 / 64)
    with torch.no_grad():
        assert_close(vit(x)["cls"], out0, tol=1e-6)  # B = 0: same function

    opt = torch.optim.SGD([p for p in vit.parameters() if p.requires_grad], lr=1.0)
    vit.train()
    vit(x)["cls"].pow(2).sum().backward()
    opt.step()
    merge_lora(vit)
    after = vit.state_dict()
    qkv0, old = after["vit.blocks.0.attn.qkv.weight"], before["vit.blocks.0.attn.qkv.weight"]
    d = 64
    assert torch.equal(qkv0[d : 2 * d], old[d : 2 * d])  # K untouched
    assert not torch.equal(qkv0[:d], old[:d]) and not torch.equal(qkv0[2 * d :], old[2 * d :])
    assert torch.equal(after["vit.blocks.0.mlp.fc1.weight"], before["vit.blocks.0.mlp.fc1.weight"])
    assert set(after) == set(before)


def test_merge_agrees_with_unmerged():
    vit = build_backbone(TINY, "random", bands=s2(*RGB, "B8"), img_size=56).eval()
    apply_explora(vit, lora_targets=("q", "k", "v", "proj", "fc1", "fc2"))
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    x = torch.rand(2, 1, 4, 56, 56) * 3000
    with torch.no_grad():
        unmerged = vit(x)
        merge_lora(vit)
        merged = vit(x)
    assert not any("lora" in n for n in vit.state_dict())
    assert type(vit.vit.blocks[0].attn.qkv) is torch.nn.Linear
    assert_close(merged["cls"], unmerged["cls"])
    assert_close(merged["patch"], unmerged["patch"])


def test_embedding_trains_only_when_bands_differ():
    for names, expect in ((RGB, False), (("B2", "B3", "B4"), False), ((*RGB, "B8"), True)):
        vit = build_backbone(TINY, "random", bands=s2(*names), img_size=56)
        report = apply_explora(vit)
        assert (report["groups"]["embedding"] > 0) is expect
        assert vit.config["explora"]["train_embedding"] is expect


def test_finetune_lora_mode_and_errors():
    vit = build_backbone(TINY, "random", bands=s2(*RGB), img_size=56)
    report = apply_explora(vit, unfreeze_blocks=[], lora_rank=8, record_as="finetune_lora")
    assert report["unfrozen_block_indices"] == []
    assert report["groups"]["lora"] == 4 * 2 * (8 * 64 * 2)
    assert report["groups"]["unfrozen_blocks"] == 0
    assert "finetune_lora" in vit.config
    with pytest.raises(UserError, match=r"blocks 0..3"):
        apply_explora(build_backbone(TINY, "random", img_size=56), unfreeze_blocks=[7])
    with pytest.raises(UserError, match="LoRA targets"):
        apply_explora(build_backbone(TINY, "random", img_size=56), lora_targets=("qk",))


@pytest.mark.parametrize(
    "name,expected", [("vit_large_patch14_dinov2", 18.7e6), ("vit_base_patch14_dinov2", 9.3e6)]
)
def test_paper_trainable_parameter_counts(name, expected):
    """ExPLoRA at the paper's settings: ViT-L/14 ~18.7M, ViT-B/14 ~9.3M trainable (RGB
    embedding frozen). Counted on the meta device: no weights, no download."""
    with torch.device("meta"):
        vit = build_backbone(name, "random", bands=s2(*RGB), img_size=224)
        report = apply_explora(vit)
    assert abs(report["trainable"] - expected) / expected < 0.02, report
    assert report["groups"]["embedding"] == 0
    assert report == parameter_report(vit)
