"""Evaluation metrics for probe and finetune, in plain torch (no scikit-learn dependency).

Everything single-label (scene classes, per-pixel classes) goes through a confusion matrix, which
is accumulated batch by batch so evaluation memory does not grow with the dataset: rows are the
true class, columns the predicted class. Averages over classes ("macro") are taken over the
classes that occur in the targets or the predictions, as scikit-learn does, so a class absent
from an evaluation split does not count as a zero.

Multi-label metrics take per-class scores and multi-hot targets.
"""

from __future__ import annotations

import torch


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """(K, K) int64 counts, rows = true class, columns = predicted class.

    ``pred`` and ``target`` are integer tensors of the same shape (any shape: chips or pixels);
    targets equal to ``ignore_index`` (e.g. 255, nodata / no label) are left out.
    """
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    if pred.shape != target.shape:
        raise ValueError(f"pred has {pred.numel()} values, target {target.numel()}")
    keep = torch.ones_like(target, dtype=torch.bool)
    if ignore_index is not None:
        keep &= target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target class ids must lie in [0, {num_classes})")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted class ids must lie in [0, {num_classes})")
    flat = target * num_classes + pred
    return (
        torch.bincount(flat, minlength=num_classes * num_classes)
        .reshape(num_classes, num_classes)
        .cpu()
    )


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1e-12), torch.zeros_like(num))


def _present(confusion: torch.Tensor) -> torch.Tensor:
    """Classes occurring in the targets or the predictions."""
    return (confusion.sum(1) + confusion.sum(0)) > 0


def classification_metrics(confusion: torch.Tensor) -> dict:
    """Top-1, balanced accuracy, macro-F1 and per-class precision/recall/F1 from a confusion matrix.

    Balanced accuracy is the mean recall over the classes present in the targets.
    """
    cm = confusion.double()
    total = cm.sum()
    tp = cm.diagonal()
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * tp, support + predicted)
    present = _present(confusion)
    has_support = support > 0
    return {
        "top1": float(tp.sum() / total) if total > 0 else float("nan"),
        "balanced_accuracy": float(recall[has_support].mean())
        if has_support.any()
        else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "per_class_precision": precision.tolist(),
        "per_class_recall": recall.tolist(),
        "per_class_f1": f1.tolist(),
        "support": support.long().tolist(),
        "count": int(total),
    }


def segmentation_metrics(confusion: torch.Tensor) -> dict:
    """mIoU, per-class IoU, pixel accuracy and macro-F1 from a per-pixel confusion matrix.

    mIoU averages the IoU of the classes present in the targets or the predictions.
    """
    cm = confusion.double()
    tp = cm.diagonal()
    union = cm.sum(1) + cm.sum(0) - tp
    iou = _safe_div(tp, union)
    present = _present(confusion)
    out = classification_metrics(confusion)
    out["miou"] = float(iou[present].mean()) if present.any() else float("nan")
    out["per_class_iou"] = iou.tolist()
    out["pixel_accuracy"] = out["top1"]
    return out


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class average precision: sum over thresholds of (recall increase) x precision, with
    tied scores forming one threshold (scikit-learn's ``average_precision_score``). NaN for a class
    with no positive target.

    ``scores`` (N, K) real scores, ``targets`` (N, K) in {0, 1}.
    """
    scores, targets = scores.double(), targets.double()
    ap = torch.full((targets.shape[1],), float("nan"), dtype=torch.float64)
    for k in range(targets.shape[1]):
        positives = targets[:, k].sum()
        if positives == 0:
            continue
        order = scores[:, k].argsort(descending=True, stable=True)
        s, tp = scores[order, k], targets[order, k].cumsum(0)
        last_of_tie = torch.ones_like(s, dtype=torch.bool)
        last_of_tie[:-1] = s[1:] != s[:-1]
        idx = last_of_tie.nonzero().squeeze(1)
        tps = tp[idx]
        precision = tps / (idx + 1).double()
        gained = torch.diff(tps, prepend=tps.new_zeros(1))
        ap[k] = (gained / positives * precision).sum()
    return ap


def multilabel_metrics(scores: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5) -> dict:
    """mAP (mean over classes with a positive), macro/micro-F1 at ``threshold`` on sigmoid
    probabilities, per-class AP and F1, and two single-number counterparts of the single-label
    metrics: ``top1`` (the best-scored class is one of the true labels) and ``balanced_accuracy``
    (mean over classes of (TPR + TNR) / 2).

    ``scores`` (N, K) logits, ``targets`` (N, K) multi-hot.
    """
    targets = targets.double()
    pred = (torch.sigmoid(scores.double()) >= threshold).double()
    tp = (pred * targets).sum(0)
    fp = (pred * (1 - targets)).sum(0)
    fn = ((1 - pred) * targets).sum(0)
    tn = ((1 - pred) * (1 - targets)).sum(0)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    present = (targets.sum(0) + pred.sum(0)) > 0
    ap = average_precision(scores, targets)
    has_pos = ~torch.isnan(ap)
    tpr = _safe_div(tp, tp + fn)
    tnr = _safe_div(tn, tn + fp)
    both = ((tp + fn) > 0) & ((tn + fp) > 0)
    top = scores.argmax(1)
    nan = float("nan")
    return {
        "map": float(ap[has_pos].mean()) if has_pos.any() else nan,
        "macro_f1": float(f1[present].mean()) if present.any() else nan,
        "micro_f1": float(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()))
        if (tp.sum() + fp.sum() + fn.sum()) > 0
        else nan,
        "top1": float(targets[torch.arange(len(top)), top].mean()) if len(top) else nan,
        "balanced_accuracy": float(((tpr + tnr) / 2)[both].mean()) if both.any() else nan,
        "per_class_ap": ap.tolist(),
        "per_class_f1": f1.tolist(),
        "support": targets.sum(0).long().tolist(),
        "count": int(targets.shape[0]),
    }
