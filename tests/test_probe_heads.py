"""The probe's math on synthetic features: the linear-head grid and weighted k-NN are honest."""

import math

import pytest
import torch

from geoexplora.pipelines.probe import (
    FEATURE_SETS,
    HeadBank,
    compose_features,
    knn_scores,
    train_linear_heads,
)

LRS = (1e-4, 1e-3, 1e-2, 0.1)
K = 4


def blobs(n: int, seed: int, dim: int = 24, spread: float = 3.0):
    """Gaussian blobs: one centre per class (the same centres for every split)."""
    centres = torch.randn(K, dim, generator=torch.Generator().manual_seed(123)) * spread
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def top1(logits, y):
    return float((logits.argmax(1) == y).double().mean())


def test_features_that_separate_classes_reach_high_accuracy_on_held_out_data():
    (xt, yt), (xv, yv), (xs, ys) = blobs(300, 0), blobs(100, 1), blobs(300, 2)
    fit = train_linear_heads({"f": xt}, yt, {"f": xv}, yv, K, LRS, steps=300)
    assert top1(fit.logits({"f": xs}), ys) > 0.95


def unrelated(n: int, seed: int, dim: int = 24):
    """Features and labels drawn independently of each other."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(0, K, (n,), generator=g)


def test_random_labels_give_chance_accuracy():
    (xt, yt), (xv, yv), (xs, ys) = unrelated(300, 0), unrelated(100, 1), unrelated(600, 2)
    fit = train_linear_heads({"f": xt}, yt, {"f": xv}, yv, K, LRS, steps=300)
    assert abs(top1(fit.logits({"f": xs}), ys) - 1 / K) < 0.07


def test_grid_has_one_head_per_feature_set_and_learning_rate():
    (xt, yt), (xv, yv) = blobs(64, 0), blobs(32, 1)
    fit = train_linear_heads(
        {"a": xt, "b": xt[:, :5]}, yt, {"a": xv, "b": xv[:, :5]}, yv, K, LRS, steps=5, batch_size=16
    )
    assert [(s.features, s.base_lr) for s in fit.specs] == [(f, lr) for f in "ab" for lr in LRS]
    assert len(fit.val_scores) == 8
    assert fit.specs[0].lr(fit.batch_size) == pytest.approx(1e-4 * 16 / 256)


def test_chosen_head_is_the_best_on_validation():
    (xt, yt), (xv, yv) = blobs(200, 0), blobs(100, 1)
    noise = torch.randn(200, 24, generator=torch.Generator().manual_seed(3))
    noise_v = torch.randn(100, 24, generator=torch.Generator().manual_seed(4))
    fit = train_linear_heads(
        {"noise": noise, "signal": xt}, yt, {"noise": noise_v, "signal": xv}, yv, K, LRS, steps=200
    )
    assert fit.val_scores[fit.best] == max(fit.val_scores)
    assert fit.best_spec.features == "signal"
    assert top1(fit.logits({"signal": xv}), yv) == pytest.approx(fit.val_scores[fit.best])


def test_heads_start_from_small_gaussian_weights_and_zero_bias():
    bank = HeadBank(3, 500, 40, torch.Generator().manual_seed(0))
    assert bank.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert bank.bias.abs().max().item() == 0.0
    x = torch.randn(2, 500)
    assert torch.allclose(bank.linear(1)(x), bank(x)[1], atol=1e-6)


def test_multilabel_heads_learn_per_class_sigmoids():
    g = torch.Generator().manual_seed(0)

    def split(n):
        y = (torch.rand(n, K, generator=g) < 0.4).float()
        return y * 4 - 2 + 0.5 * torch.randn(n, K, generator=g), y

    (xt, yt), (xv, yv), (xs, ys) = split(200), split(80), split(200)
    fit = train_linear_heads({"f": xt}, yt, {"f": xv}, yv, K, LRS, multilabel=True, steps=300)
    assert fit.val_metric == "map"
    from geoexplora.train.metrics import multilabel_metrics

    assert multilabel_metrics(fit.logits({"f": xs}), ys)["map"] > 0.95


def test_knn_votes_are_weighted_by_exp_similarity_over_temperature():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    votes = knn_scores(bank, labels, query, num_classes=2, k=2, temperature=0.5)
    w0, w1 = math.exp(1.0 / 0.5), math.exp(0.8 / 0.5)  # the two nearest: sims 1.0 and 0.8
    assert votes[0].tolist() == pytest.approx([w0 / (w0 + w1), w1 / (w0 + w1)])


def test_knn_separates_blobs_and_is_at_chance_on_random_labels():
    (xt, yt), (xs, ys) = blobs(300, 0), blobs(300, 2)
    assert top1(knn_scores(xt, yt, xs, K), ys) > 0.95
    (xt, yt), (xs, ys) = unrelated(300, 0), unrelated(600, 2)
    assert abs(top1(knn_scores(xt, yt, xs, K), ys) - 1 / K) < 0.07


def test_feature_sets_are_built_from_the_cached_parts():
    cls_blocks = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    patch_mean = -torch.ones(2, 3)
    assert compose_features(cls_blocks, patch_mean, "cls").tolist() == cls_blocks[:, -1].tolist()
    assert compose_features(cls_blocks, patch_mean, "cls4").shape == (2, 12)
    both = compose_features(cls_blocks, patch_mean, "cls4+mean")
    assert both.shape == (2, 15) and both[:, -3:].tolist() == patch_mean.tolist()
    assert set(FEATURE_SETS) == {"cls", "cls4", "cls+mean", "cls4+mean"}
