"""Fine-tuning's parts: what each mode trains, losses, class weights, nodata, augmentation."""

import pytest
import torch

from geoexplora.bands import get_band
from geoexplora.io.chips import IGNORE_INDEX
from geoexplora.pipelines.finetune import (
    EarlyStopping,
    FinetuneObjective,
    build_task_model,
    class_weights,
    dihedral,
    ignore_nodata,
    parameterise,
    positive_weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = [{"id": i, "name": n, "color": "#000000"} for i, n in enumerate("abc")]


def task_model(task="classification", frames=1):
    from geoexplora.models import build_backbone

    torch.manual_seed(0)
    bands = [get_band("sentinel2", b) for b in ("B2", "B3", "B4", "B8")]
    vit = build_backbone(
        "geo_vit_tiny_patch16", init_weights="random", bands=bands, img_size=32, num_frames=frames
    )
    return build_task_model(vit, task, CLASSES)


def batch(task="classification", n=4):
    g = torch.Generator().manual_seed(1)
    b = {
        "image": 1000 + 500 * torch.rand(n, 1, 4, 32, 32, generator=g),
        "label": torch.tensor([0, 1, 2, 1][:n]),
        "dates": torch.zeros(n, 1),
    }
    if task == "segmentation":
        b["mask"] = torch.randint(0, 3, (n, 32, 32), generator=g)
    return b


def changed_after_steps(model, task="classification", steps=2):
    objective = FinetuneObjective(model, task, torch.ones(3), 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        objective(batch(task), step)["loss"].backward()
        opt.step()
        opt.zero_grad()
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def test_lora_mode_changes_only_lora_and_head_parameters():
    model = task_model()
    report = parameterise(model, "lora", lora_rank=8, lora_alpha=1.0)
    changed = changed_after_steps(model)
    assert changed and all("lora_" in k or k.startswith("head.") for k in changed)
    assert any("lora_" in k for k in changed) and any(k.startswith("head.") for k in changed)
    assert set(report["groups"]) >= {"lora", "heads"}
    assert report["trainable"] == report["groups"]["lora"] + report["groups"]["heads"]
    # rank 8 on q and v of all 4 blocks (dim 64): 4 blocks x 2 x (8x64 + 64x8)
    assert report["groups"]["lora"] == 4 * 2 * 2 * 8 * 64
    assert model.backbone.config["finetune_lora"]["lora_rank"] == 8


def test_linear_mode_trains_the_head_only():
    model = task_model()
    parameterise(model, "linear", 8, 1.0)
    changed = changed_after_steps(model)
    assert changed and all(k.startswith("head.") for k in changed)


def test_full_mode_trains_the_backbone_too():
    model = task_model()
    report = parameterise(model, "full", 8, 1.0)
    changed = changed_after_steps(model)
    assert any(k.startswith("backbone.vit.blocks.0.") for k in changed)
    assert report["fraction"] == 1.0


def test_explora_mode_trains_the_last_block_lora_and_norms():
    model = task_model()
    report = parameterise(model, "explora", 8, 1.0)
    assert report["unfrozen_block_indices"] == [3]
    changed = changed_after_steps(model)
    assert any(k.startswith("backbone.vit.blocks.3.mlp") for k in changed)
    assert not any(k.startswith("backbone.vit.blocks.0.mlp") for k in changed)
    assert any("lora_" in k and "blocks.0." in k for k in changed)


def test_segmentation_head_predicts_every_pixel_and_ignores_no_label():
    model = task_model("segmentation")
    b = batch("segmentation")
    logits = model(b["image"])
    assert logits.shape == (4, 3, 32, 32)
    objective = FinetuneObjective(model, "segmentation", torch.ones(3), 0.0)
    everything = objective(b, 0)["loss"]
    b["mask"][:, :16] = IGNORE_INDEX
    masked = objective(b, 0)["loss"]
    expected = torch.nn.functional.cross_entropy(logits[:, :, 16:], b["mask"][:, 16:])
    assert masked.item() == pytest.approx(expected.item(), rel=1e-5)
    assert masked.item() != pytest.approx(everything.item(), rel=1e-5)


def test_nodata_pixels_are_ignored_where_every_frame_is_nodata():
    image = torch.ones(2, 3, 4, 4)  # T=2, C=3
    image[0, 1, 0, 0] = float("nan")  # first frame: one band missing at (0, 0)
    image[:, :, 1, 1] = float("nan")  # both frames missing at (1, 1)
    mask = torch.zeros(4, 4, dtype=torch.int64)
    out = ignore_nodata(mask, image)
    assert out[1, 1] == IGNORE_INDEX
    assert out[0, 0] == 0  # valid in the second frame
    assert (out == IGNORE_INDEX).sum() == 1


def test_class_weights_counter_imbalance_with_mean_one():
    counts = torch.tensor([900.0, 100.0, 0.0])
    w = class_weights(counts, "inverse_sqrt")
    assert w[1] / w[0] == pytest.approx(3.0)
    assert w[:2].mean().item() == pytest.approx(1.0) and w[2] == 1.0
    assert class_weights(counts, "inverse")[1] / class_weights(counts, "inverse")[
        0
    ] == pytest.approx(9.0)
    assert class_weights(counts, "none").tolist() == [1.0, 1.0, 1.0]


def test_multilabel_positive_weights_follow_the_negative_to_positive_ratio():
    w = positive_weights(torch.tensor([10.0, 50.0]), 100, "inverse")
    assert w.tolist() == pytest.approx([9.0, 1.0])
    assert positive_weights(torch.tensor([10.0, 50.0]), 100, "inverse_sqrt")[0] == pytest.approx(
        3.0
    )


def test_dihedral_augmentation_moves_image_and_mask_together():
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    item = {"image": image, "mask": image[0, 0].long()}
    for k in range(4):
        for flip in (False, True):
            out = dihedral(item, k, flip)
            assert torch.equal(out["image"][0, 0].long(), out["mask"])
    assert torch.equal(dihedral(item, 1, False)["image"][0, 0], torch.rot90(image[0, 0]))


def test_early_stopping_counts_evaluations_without_improvement():
    stopping = EarlyStopping(patience=2)
    assert [stopping.update(s, step) for step, s in enumerate([0.5, 0.7, 0.6, 0.7])] == [
        True,
        True,
        False,
        False,
    ]  # equal to the best is not better
    assert (float(stopping.best_score), int(stopping.best_step)) == (0.7, 1)
    assert stopping.exhausted and int(stopping.evals_since_best) == 2
    assert stopping.update(0.9, 4) and not stopping.exhausted


def test_early_stopping_ignores_scores_that_are_not_numbers():
    stopping = EarlyStopping(patience=3)
    assert not stopping.update(float("nan"), 0)
    assert float(stopping.best_score) == float("-inf") and int(stopping.best_step) == -1


def test_early_stopping_state_survives_a_checkpoint_round_trip():
    before = EarlyStopping(patience=3)
    for step, score in enumerate([0.4, 0.3, 0.2]):
        before.update(score, step)
    after = EarlyStopping(patience=3)
    after.load_state_dict(before.state_dict())  # what resume restores
    assert (float(after.best_score), int(after.best_step), int(after.evals_since_best)) == (
        0.4,
        0,
        2,
    )
    assert not after.update(0.1, 3) and after.exhausted
