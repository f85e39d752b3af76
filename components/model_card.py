"""The model card and lineage of a published version (`assets.extra/model_card.{json,md}`): what
the model is, what it is for, what trained it, how good it is, what it is not good at, and where
it came from (code commit, config, data fingerprint, the gate's and infra validation's decisions).

Fields follow the sections of TFX's Model Card Toolkit schema (model_details, model_parameters,
quantitative_analysis, considerations) where they fit; the toolkit itself does not install
beside TensorFlow 2.21.
"""

from __future__ import annotations

import datetime
import math
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
SCHEMA = (
    "model-card-toolkit 0.0.2 sections (model_details, model_parameters, "
    "quantitative_analysis, considerations) + lineage"
)


def code_version(root: Path) -> dict[str, Any]:
    """The git commit of the code that trained the model, and whether the tree was dirty."""
    try:
        commit = _git(root, "rev-parse", "HEAD")
        dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "note": "not a git checkout"}


def _git(root: Path, *args: str) -> str:
    """What a git command prints in `root`, stripped; raises when git fails or is missing."""
    return subprocess.run(
        ["git", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.strip()


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = 15
) -> float:
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    error = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(error)


INTENDED_USE = {
    "use": "classify a single handwritten digit 0-9 written in dark ink on a light page (or "
    "white on black, as in MNIST)",
    "out_of_scope": [
        "letters, several digits per image, non-digit images (the model always answers a digit)",
        "decisions that need calibrated probabilities beyond the measured calibration error",
    ],
}
INPUT_CONTRACT = {
    "serving_default": "uint8 [N, 28, 28], raw pixels 0..255, white digit on black",
    "predict_png": "string [N], PNG/JPEG of a 28x28 grayscale digit",
    "predict_image": "string [N], PNG/JPEG/GIF/BMP photo of one digit, any size (normalised in "
    "the graph as MNIST was)",
}


def build(
    *,
    version: int,
    run_id: str,
    metrics: dict[str, Any],
    config: dict[str, Any],
    effective: dict[str, Any],
    probabilities: np.ndarray,
    labels: np.ndarray,
    parameters: int,
    data: dict[str, Any],
    code: dict[str, Any],
    signatures: list[str],
) -> dict[str, Any]:
    per_class = metrics["per_class"]
    weakest = sorted(per_class, key=lambda c: per_class[c]["f1"])[:3]
    gate = metrics.get("gate", {})
    return {
        "schema": SCHEMA,
        "model_details": _model_details(version, run_id, config, parameters),
        "intended_use": {
            **INTENDED_USE,
            "input_contract": {**INPUT_CONTRACT, "signatures": signatures},
        },
        "model_parameters": {
            "data": data,
            "config": config,
            "effective_settings": effective,
        },
        "quantitative_analysis": _quantitative_analysis(metrics, probabilities, labels, weakest),
        "considerations": {
            "limitations": [
                "trained on MNIST only: centred, size-normalised digits by American writers; "
                "other styles, stroke widths and scripts are less accurate",
                "handwriting, not print: typed digits are sometimes misread (a font's 1 with "
                "its flag and foot as 3, its 6 as 5), usually flagged uncertain",
                "one digit per image: predict_image reads the digit with the most ink and "
                "ignores the rest; a photo with no clear digit is refused",
                f"weakest classes on the test split: {', '.join(str(c) for c in weakest)}",
                "probabilities are softmax outputs, not calibrated beyond the reported "
                "expected calibration error",
            ],
        },
        "lineage": {
            "code": code,
            "data_fingerprint": data.get("fingerprint"),
            "baseline_version": gate.get("baseline_version"),
            "gate": gate,
            "infra_validation": metrics.get("infra_validation"),
        },
    }


def _model_details(
    version: int, run_id: str, config: dict[str, Any], parameters: int
) -> dict[str, Any]:
    """Which model this is, and its architecture in a sentence."""
    return {
        "name": "mnist",
        "version": version,
        "run_id": run_id,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "overview": "Handwritten-digit classifier: Flatten (28x28 -> 784) -> Dense("
        f"{config['hidden_units']}, ReLU)"
        + (f" -> Dropout({config['dropout']})" if config["dropout"] else "")
        + " -> Dense(10, softmax); Adam, sparse categorical cross-entropy.",
        "parameters": parameters,
    }


def _quantitative_analysis(
    metrics: dict[str, Any], probabilities: np.ndarray, labels: np.ndarray, weakest: list[str]
) -> dict[str, Any]:
    """How good the model is on the test split: accuracy with its 95% interval, per class,
    and calibration."""
    n = int(len(labels))
    correct = int((probabilities.argmax(1) == labels).sum())
    low, high = wilson_interval(correct, n)
    per_class = metrics["per_class"]
    return {
        "test_examples": n,
        "accuracy": metrics["test_accuracy"],
        "accuracy_95ci": [round(low, 5), round(high, 5)],
        "loss": metrics["test_loss"],
        "per_class": per_class,
        "weakest_classes": [{"class": int(c), **per_class[c]} for c in weakest],
        "expected_calibration_error": round(expected_calibration_error(probabilities, labels), 5),
    }


def markdown(card: dict[str, Any]) -> str:
    d, q, lineage = card["model_details"], card["quantitative_analysis"], card["lineage"]
    data = card["model_parameters"]["data"]
    lo, hi = q["accuracy_95ci"]
    code = lineage["code"]
    lines = [
        f"# Model card: {d['name']} version {d['version']}",
        "",
        f"{d['overview']} {d['parameters']:,} parameters. Run `{d['run_id']}`, {d['date']}.",
        "",
        "## Intended use",
        card["intended_use"]["use"] + ".",
        "",
        "| signature | input |",
        "|---|---|",
        *[
            f"| `{k}` | {v} |"
            for k, v in card["intended_use"]["input_contract"].items()
            if k != "signatures"
        ],
        "",
        "Out of scope: " + "; ".join(card["intended_use"]["out_of_scope"]) + ".",
        "",
        "## Training data",
        f"TFDS `{data.get('tfds_name')}` {data.get('tfds_version')}: "
        f"{data['examples']['train']} train, {data['examples']['validation']} validation "
        f"(held out of train with seed {card['model_parameters']['config']['seed']}), "
        f"{data['examples']['test']} test. Data fingerprint `{data.get('fingerprint')}`.",
        *_manual_files(data),
        "",
        "## Evaluation (test split, through the exported model)",
        f"Accuracy **{q['accuracy']:.4f}** (95% interval {lo:.4f}-{hi:.4f}) on "
        f"{q['test_examples']} examples; loss {q['loss']:.4f}; expected calibration error "
        f"{q['expected_calibration_error']:.4f}.",
        "",
        "| class | precision | recall | F1 |",
        "|---|---|---|---|",
        *[
            f"| {c} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} |"
            for c, m in sorted(q["per_class"].items(), key=lambda kv: int(kv[0]))
        ],
        "",
        "## Limitations",
        *[f"- {x}" for x in card["considerations"]["limitations"]],
        "",
        "## Lineage",
        f"- code: `{code.get('commit')}`{_tree_state(code.get('dirty'))}",
        f"- baseline compared with: version {lineage['baseline_version']}"
        if lineage["baseline_version"] is not None
        else "- baseline: none (first version)",
        f"- gate: {'blessed' if lineage['gate'].get('blessed') else 'refused'}: "
        f"{lineage['gate'].get('reason')}",
        f"- infra validation: passed ({(lineage['infra_validation'] or {}).get('seconds')} s, "
        f"{(lineage['infra_validation'] or {}).get('warmup_records_replayed')} warmup records)",
        "",
        "The full config and every field above are in `model_card.json`.",
        "",
    ]
    return "\n".join(lines)


def _manual_files(data: dict[str, Any]) -> list[str]:
    """The SHA-256 of each file TFDS prepared the data from (its manual dir), as lines."""
    files = data.get("manual_files_sha256") or {}
    if not files:
        return []
    return ["", "Prepared from (SHA-256):", *[f"- `{n}`: `{h}`" for n, h in sorted(files.items())]]


def _tree_state(dirty: bool | None) -> str:
    """Whether the commit is the whole code: a dirty tree trained with changes not in it."""
    if dirty is None:
        return " (tree state unknown)"
    return " (uncommitted changes in the tree)" if dirty else " (clean tree)"
