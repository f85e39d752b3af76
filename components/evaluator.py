"""Evaluator: test-split metrics from one batched prediction pass (loss, accuracy, per class)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np

from components.data import NUM_CLASSES, Split, preprocess
from components.files import save_npz


def predict_probabilities(
    model: keras.Model, images: np.ndarray, batch_size: int = 2048
) -> np.ndarray:
    """Class probabilities for uint8 images [N, 28, 28], normalised by the shared preprocess."""
    return predict_with_loss(model, images, None, batch_size)[0]


def predict_with_loss(
    model: keras.Model, images: np.ndarray, labels: np.ndarray | None, batch_size: int = 2048
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities and, given labels, each example's loss as Keras computes `val_loss`: from
    the logits behind the softmax (Keras keeps them on the output), not from probabilities,
    which would cap a confidently wrong example at -log(1e-7) = 16.1.

    Eager batches rather than `model.predict`: no predict function to trace and compile.
    """
    probabilities, losses = [], []
    for start in range(0, len(images), batch_size):
        output = model(preprocess(images[start : start + batch_size]), training=False)
        probabilities.append(np.asarray(output, dtype=np.float32))
        if labels is not None:
            if not hasattr(output, "_keras_logits"):  # e.g. a model without a final softmax
                warnings.warn(
                    "no logits on the model's output: the loss is computed from its "
                    "probabilities (clipped at 1e-7)",
                    stacklevel=2,
                )
            loss = keras.losses.sparse_categorical_crossentropy(
                np.asarray(labels[start : start + batch_size], np.int64), output
            )
            losses.append(np.asarray(loss, dtype=np.float64))
    empty = np.zeros((0, NUM_CLASSES), np.float32)
    return (
        np.concatenate(probabilities) if probabilities else empty,
        (np.concatenate(losses) if losses else np.zeros(0)) if labels is not None else None,
    )


def compute_metrics(
    probabilities: np.ndarray, labels: np.ndarray, losses: np.ndarray | None = None
) -> dict[str, Any]:
    """Loss, accuracy, per-class precision/recall/F1/support and the confusion matrix.

    `losses`: per-example losses from `predict_with_loss` (Keras's definition, as `val_loss`);
    without them the loss is computed from the probabilities, clipped at 1e-7 as Keras clips
    probabilities (the same for any example the model does not get confidently wrong).
    """
    labels = np.asarray(labels, dtype=np.int64)
    predicted = probabilities.argmax(axis=1)
    if losses is None:
        p_true = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)
        losses = -np.log(p_true)
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    true_pos = np.diag(confusion).astype(np.float64)
    predicted_count = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted_count > 0, true_pos / predicted_count, 0.0)
        recall = np.where(support > 0, true_pos / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    per_class = {
        str(c): {
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "support": int(support[c]),
        }
        for c in range(NUM_CLASSES)
    }
    return {
        "test_loss": float(np.mean(losses)) if len(labels) else float("nan"),
        "test_accuracy": float((predicted == labels).mean()),
        "test_examples": int(len(labels)),
        "macro_f1": float(f1.mean()),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def report_inputs(
    probabilities: np.ndarray, test: Split, train_sample: Split
) -> dict[str, np.ndarray]:
    """What the report is drawn from: the test split, its probabilities, a training sample."""
    return {
        "images": test.images,
        "labels": test.labels,
        "probabilities": probabilities,
        "train_images": train_sample.images,
        "train_labels": train_sample.labels,
    }


def save_predictions(
    path: Path, probabilities: np.ndarray, test: Split, train_sample: Split
) -> dict[str, np.ndarray]:
    """Save what the report is drawn from (atomically), so it never needs the model again."""
    arrays = report_inputs(probabilities, test, train_sample)
    save_npz(path, **arrays)
    return arrays


# Uncertainty: a prediction is flagged `uncertain` when its top probability is below a threshold
# calibrated on the validation split: low enough that at most MAX_CORRECT_FLAGGED of the correct
# validation predictions are flagged, otherwise as high as needed to flag TARGET_MISTAKES_FLAGGED
# of the mistakes.
TARGET_MISTAKES_FLAGGED = 0.9
MAX_CORRECT_FLAGGED = 0.05
MIN_TOP_PROBABILITY = 0.1  # of 10 classes, the most likely has at least this
FALLBACK_THRESHOLD = 0.9  # no validation split (--validation-fraction 0): not calibrated


def calibrate_uncertainty(
    probabilities: np.ndarray | None, labels: np.ndarray | None
) -> dict[str, Any]:
    if probabilities is None or labels is None or not len(labels):
        return {
            "threshold": FALLBACK_THRESHOLD,
            "calibrated": False,
            "note": "no validation split: a fixed threshold, not calibrated",
        }
    confidence = probabilities.max(1).astype(np.float32)  # (as the graph compares them)
    correct = probabilities.argmax(1) == labels
    # Flagged means confidence < threshold. The cap lies between the k-th and (k+1)-th lowest
    # confidences of the right answers, k = floor(5% of them): at most k right answers are
    # below it (an interpolated quantile lets one more through). The want lies between the
    # m-th and (m+1)-th lowest of the mistakes, m = ceil(90% of them): at least m are below.
    # Halfway, not on a value: the exported graph computes the same probabilities in another
    # order of operations, a few units in the last place apart.
    right, wrong = np.sort(confidence[correct]), np.sort(confidence[~correct])
    k = int(np.floor(MAX_CORRECT_FLAGGED * len(right)))
    cap = _between(right[k - 1] if k else MIN_TOP_PROBABILITY, right[k]) if len(right) else np.inf
    m = int(np.ceil(TARGET_MISTAKES_FLAGGED * len(wrong)))
    want = _between(wrong[m - 1], wrong[m] if m < len(wrong) else 1.0, above=True) if m else cap
    threshold = float(min(cap, want))
    return {
        "threshold": threshold,
        "calibrated": True,
        "validation_examples": int(len(labels)),
        **uncertainty_rates(probabilities, labels, threshold),
    }


def _between(low: float, high: float, above: bool = False) -> float:
    """A float32 threshold halfway from `low` to `high`; strictly above `low` when `above`
    (so that `low` itself is below it), else at most `high`."""
    mid = np.float32((np.float64(low) + np.float64(high)) / 2)
    if above and mid <= low:
        mid = np.nextafter(np.float32(low), np.float32(np.inf))
    return float(mid)


def uncertainty_rates(
    probabilities: np.ndarray, labels: np.ndarray, threshold: float
) -> dict[str, Any]:
    """Fraction flagged, and how the flag splits right and wrong predictions."""
    flagged = probabilities.max(1) < threshold
    correct = probabilities.argmax(1) == labels

    def share(mask: np.ndarray, within: np.ndarray) -> float | None:
        return float(mask[within].mean()) if within.any() else None

    return {
        "flagged_fraction": float(flagged.mean()) if len(labels) else 0.0,
        "mistakes_flagged": share(flagged, ~correct),
        "correct_flagged": share(flagged, correct),
        "accuracy_flagged": share(correct, flagged),
        "accuracy_unflagged": share(correct, ~flagged),
    }
