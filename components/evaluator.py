"""Evaluator: test-split metrics from one batched prediction pass (loss, accuracy, per class)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np

from components.data import NUM_CLASSES, Split, preprocess

PREDICTIONS_FILE = "predictions.npz"


def predict_probabilities(
    model: keras.Model, images: np.ndarray, batch_size: int = 2048
) -> np.ndarray:
    """Class probabilities for uint8 images [N, 28, 28], normalised by the shared preprocess."""
    x = preprocess(images).numpy()
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32)


def compute_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Loss, accuracy, per-class precision/recall/F1/support and the confusion matrix."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = probabilities.argmax(axis=1)
    # Same clipping as Keras's sparse categorical cross-entropy on probabilities.
    p_true = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)
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
        "test_loss": float(-np.log(p_true).mean()),
        "test_accuracy": float((predicted == labels).mean()),
        "test_examples": int(len(labels)),
        "macro_f1": float(f1.mean()),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def save_predictions(
    path: Path, probabilities: np.ndarray, test: Split, train_sample: Split
) -> dict[str, np.ndarray]:
    """Save what the report is drawn from (atomically), so it never needs the model again."""
    arrays = {
        "images": test.images,
        "labels": test.labels,
        "probabilities": probabilities,
        "train_images": train_sample.images,
        "train_labels": train_sample.labels,
    }
    tmp = Path(path).with_name(f".tmp-{Path(path).name}")
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    tmp.replace(path)
    return arrays


def load_predictions(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


# Uncertainty: a prediction is flagged `uncertain` when its top probability is below a threshold
# calibrated on the validation split: low enough that at most MAX_CORRECT_FLAGGED of the correct
# validation predictions are flagged, otherwise as high as needed to flag TARGET_MISTAKES_FLAGGED
# of the mistakes.
TARGET_MISTAKES_FLAGGED = 0.9
MAX_CORRECT_FLAGGED = 0.05
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
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    cap = float(np.quantile(confidence[correct], MAX_CORRECT_FLAGGED)) if correct.any() else 1.0
    want = (
        float(np.quantile(confidence[~correct], TARGET_MISTAKES_FLAGGED))
        if (~correct).any()
        else cap
    )
    threshold = float(min(cap, want))
    return {
        "threshold": threshold,
        "calibrated": True,
        "validation_examples": int(len(labels)),
        **uncertainty_rates(probabilities, labels, threshold),
    }


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
