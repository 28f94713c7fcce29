"""Metrics shared by probe and finetune (geoexplora.train.metrics), checked on hand-worked cases."""

import math

import pytest
import torch

from geoexplora.train.metrics import (
    average_precision,
    classification_metrics,
    confusion_matrix,
    multilabel_metrics,
    segmentation_metrics,
)


def test_confusion_matrix_rows_are_true_class_columns_predicted():
    cm = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_confusion_matrix_leaves_out_ignored_targets():
    pred = torch.tensor([[0, 1], [1, 1]])
    target = torch.tensor([[0, 255], [255, 1]])
    cm = confusion_matrix(pred, target, 2, ignore_index=255)
    assert cm.tolist() == [[1, 0], [0, 1]]


def test_confusion_matrix_rejects_class_ids_out_of_range():
    with pytest.raises(ValueError, match="target class ids"):
        confusion_matrix(torch.tensor([0]), torch.tensor([3]), 3)


def test_classification_metrics_on_a_worked_example():
    # true 0: 3 chips (2 right), true 1: 1 chip (right), true 2: none, predicted once.
    cm = torch.tensor([[2, 0, 1], [0, 1, 0], [0, 0, 0]])
    m = classification_metrics(cm)
    assert m["top1"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)  # class 2 has no support
    f1 = [2 * 2 / (3 + 2), 1.0, 0.0]
    assert m["per_class_f1"] == pytest.approx(f1)
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)  # class 2 was predicted: it counts
    assert m["support"] == [3, 1, 0]


def test_classification_macro_ignores_classes_absent_from_targets_and_predictions():
    cm = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    m = classification_metrics(cm)
    assert m["macro_f1"] == 1.0
    assert m["balanced_accuracy"] == 1.0


def test_segmentation_metrics_iou_per_class_and_mean():
    cm = torch.tensor([[3, 1], [1, 5]])
    m = segmentation_metrics(cm)
    assert m["per_class_iou"] == pytest.approx([3 / 5, 5 / 7])
    assert m["miou"] == pytest.approx((3 / 5 + 5 / 7) / 2)
    assert m["pixel_accuracy"] == pytest.approx(8 / 10)


def test_average_precision_matches_the_step_wise_definition():
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.6]])
    targets = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    # thresholds: 0.9 -> P=1, R=1/2; 0.7 -> P=2/3, R=1
    assert average_precision(scores, targets).item() == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_average_precision_counts_tied_scores_as_one_threshold():
    scores = torch.tensor([[0.9], [0.8], [0.8], [0.6]])
    for targets in ([1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]):
        t = torch.tensor(targets).unsqueeze(1)
        assert average_precision(scores, t).item() == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_average_precision_is_nan_for_a_class_without_positives():
    ap = average_precision(torch.rand(5, 2), torch.tensor([[1.0, 0.0]] * 5))
    assert ap[0].item() == 1.0 and math.isnan(ap[1].item())


def test_multilabel_metrics_on_perfect_and_inverted_scores():
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    perfect = multilabel_metrics(targets * 10 - 5, targets)
    assert perfect["map"] == 1.0 and perfect["macro_f1"] == 1.0 and perfect["micro_f1"] == 1.0
    assert perfect["top1"] == 1.0 and perfect["balanced_accuracy"] == 1.0
    inverted = multilabel_metrics(5 - targets * 10, targets)
    assert inverted["macro_f1"] == 0.0 and inverted["top1"] == 0.0
    assert inverted["map"] < 0.7
