"""Report: the figures a person looks at, drawn from the evaluation outputs (no model needed)."""

from __future__ import annotations

import functools
import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import numpy as np
from matplotlib.figure import Figure

GRID = 25  # test predictions shown in the grid
MISTAKES = 25  # most confident mistakes shown


PREDICTIONS_FILE = "predictions.npz"  # what the report is drawn from, in a run's folder


def load_predictions(path: Path) -> dict[str, np.ndarray]:
    """The report's inputs as the evaluator saved them (NumPy only: redrawing a report needs
    neither TensorFlow nor the model). A damaged or foreign file is a ValueError naming it."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, TypeError, zipfile.BadZipFile) as e:
        # TypeError: a plain .npy (an array, not an archive of arrays)
        raise ValueError(f"{path} is damaged or not the evaluator's output ({e})") from None
    _check_report_inputs(path, arrays)
    return arrays


def _check_report_inputs(path: Path, arrays: dict[str, np.ndarray]) -> None:
    shapes = {k: getattr(arrays.get(k), "shape", None) for k in _REPORT_INPUTS}
    n, m = (shapes["labels"] or (None,))[0], (shapes["train_labels"] or (None,))[0]
    expected = {
        "images": (n, 28, 28),
        "labels": (n,),
        "probabilities": (n, 10),
        "train_images": (m, 28, 28),
        "train_labels": (m,),
    }
    if shapes != expected or n is None:
        raise ValueError(
            f"{path} is not the evaluator's output: arrays {shapes}, expected {expected}"
        )


_REPORT_INPUTS = ("images", "labels", "probabilities", "train_images", "train_labels")


def _subplots(*grid: int, figsize: tuple[float, float]):
    """pyplot-free figures: no global state, so figures can be drawn off the main thread."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid) if grid else fig.subplots()


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def rgb_pixels(fig: Figure) -> np.ndarray:
    """The figure rendered at 100 dpi as uint8 [H, W, 3]: for TensorBoard images, which encodes
    them itself (no PNG encoded here only to be decoded again)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(100)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def figure_digit(image: np.ndarray, title: str, color: str = "black") -> Figure:
    fig, ax = _subplots(figsize=(3, 3.3))
    ax.imshow(image, cmap="gray_r", vmin=0, vmax=255)
    ax.set_title(title, color=color)
    ax.axis("off")
    return fig


def figure_grid(
    images: np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray,
    indices: np.ndarray,
    title: str,
) -> Figure:
    """Digits with "pred (confidence) / true"; mistakes in red with a red frame.

    Drawn as one mosaic image in one axes (not one axes per digit): four times faster, which
    matters because TensorBoard gets this figure at every epoch.
    """
    cols, cell, pad = 5, 28, 6
    n = len(indices)
    rows = max(1, int(np.ceil(n / cols)))
    mosaic = np.full((rows * (cell + 2 * pad), cols * (cell + 2 * pad), 3), 255, np.uint8)
    fig, ax = _subplots(figsize=(cols * 1.9, rows * 2.1))
    for k, i in enumerate(indices):
        r, c = divmod(k, cols)
        top, left = r * (cell + 2 * pad), c * (cell + 2 * pad)
        pred, true = int(probabilities[i].argmax()), int(labels[i])
        wrong = pred != true
        if wrong:  # red frame
            mosaic[top + pad - 2 : top + pad + cell + 2, left + pad - 2 : left + pad + cell + 2] = (
                220,
                30,
                30,
            )
        mosaic[top + pad : top + pad + cell, left + pad : left + pad + cell] = (255 - images[i])[
            ..., None
        ]
        ax.text(
            left + pad + cell / 2,
            top + 1,
            f"pred {pred} ({percent(float(probabilities[i, pred]))})  true {true}",
            ha="center",
            va="bottom",
            fontsize=8,
            color="red" if wrong else "black",
        )
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_ylim(mosaic.shape[0], -8)
    ax.axis("off")
    if n == 0:
        ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, pad=12)
    fig.tight_layout()
    return fig


def figure_confusion(confusion: np.ndarray, title: str = "Confusion matrix (test split)") -> Figure:
    confusion = np.asarray(confusion)
    fig, ax = _subplots(figsize=(6.5, 5.5))
    # Log colour scale so the off-diagonal errors stay visible next to ~1000 correct per class.
    shown = np.log1p(confusion)
    im = ax.imshow(shown, cmap="Blues")
    for (r, c), v in np.ndenumerate(confusion):
        if v:
            ax.text(
                c,
                r,
                str(v),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if shown[r, c] > shown.max() * 0.6 else "black",
            )
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="log(1 + count)")
    fig.tight_layout()
    return fig


def figure_curves(history: dict[str, list[float | None]]) -> Figure:
    """Loss and accuracy per epoch; an epoch whose logs were lost (None) is a gap."""
    fig, (ax_loss, ax_acc) = _subplots(1, 2, figsize=(10, 3.8))
    for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        for prefix, style in (("", "o-"), ("val_", "s--")):
            values = history.get(prefix + key)
            if values:
                ax.plot(
                    range(1, len(values) + 1),
                    [math.nan if v is None else v for v in values],
                    style,
                    label="validation" if prefix else "train",
                )
        ax.set_xlabel("epoch")
        epochs = max((len(history.get(p + key) or []) for p in ("", "val_")), default=0)
        ax.set_xlim(0.5, max(epochs, 1) + 0.5)  # one epoch: a point at 1, not ticks 0.95-1.05
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def figure_confidence(labels: np.ndarray, probabilities: np.ndarray) -> Figure:
    """Confidence histogram (correct vs wrong) and a reliability diagram."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    fig, (ax_hist, ax_rel) = _subplots(1, 2, figsize=(10, 3.8))
    bins = np.linspace(0, 1, 21)
    ax_hist.hist(confidence[correct], bins=bins, alpha=0.7, label="correct", log=True)
    ax_hist.hist(confidence[~correct], bins=bins, alpha=0.7, label="wrong", log=True, color="red")
    ax_hist.set_xlabel("confidence (max probability)")
    ax_hist.set_ylabel("examples (log)")
    ax_hist.set_title("Confidence")
    ax_hist.legend()
    edges = np.linspace(0, 1, 11)
    which = np.clip(np.digitize(confidence, edges) - 1, 0, 9)
    centers, accuracies = [], []
    for b in range(10):
        mask = which == b
        if mask.any():
            centers.append(confidence[mask].mean())
            accuracies.append(correct[mask].mean())
    ax_rel.plot([0, 1], [0, 1], ":", color="gray", label="perfectly calibrated")
    ax_rel.plot(centers, accuracies, "o-", label="model")
    ax_rel.set_xlabel("mean confidence in bin")
    ax_rel.set_ylabel("accuracy in bin")
    ax_rel.set_title("Reliability diagram")
    ax_rel.legend()
    ax_rel.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def mistake_indices(labels: np.ndarray, probabilities: np.ndarray, n: int = MISTAKES) -> np.ndarray:
    """Indices of the wrong predictions, most confident first."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    order = np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")
    return wrong[order][:n]


def build_figures(
    predictions: dict[str, np.ndarray],
    metrics: dict[str, Any],
    history: dict[str, list[float | None]] | None,
) -> dict[str, bytes]:
    """All report figures as PNG bytes, keyed by file name."""
    images, labels, probs = (
        predictions["images"],
        predictions["labels"],
        predictions["probabilities"],
    )
    figures: dict[str, bytes] = {}
    if len(predictions.get("train_labels", [])):
        figures["train_sample.png"] = png_bytes(
            figure_digit(
                predictions["train_images"][0],
                f"training sample: label {predictions['train_labels'][0]}",
            )
        )
    pred0 = int(probs[0].argmax())
    figures["first_test.png"] = png_bytes(
        figure_digit(
            images[0],
            f"first test image: predicted {pred0}, true {int(labels[0])}",
            "black" if pred0 == int(labels[0]) else "red",
        )
    )
    figures["predictions.png"] = png_bytes(
        figure_grid(
            images,
            labels,
            probs,
            np.arange(min(GRID, len(labels))),
            "Test predictions (first 25): predicted vs true, mistakes in red",
        )
    )
    mistakes = mistake_indices(labels, probs)
    figures["mistakes.png"] = png_bytes(
        figure_grid(
            images,
            labels,
            probs,
            mistakes,
            f"Most confident mistakes ({len(mistakes)} shown of "
            f"{int((probs.argmax(1) != labels).sum())})"
            if len(mistakes)
            else "No mistakes on the test split",
        )
    )
    figures["confusion_matrix.png"] = png_bytes(figure_confusion(metrics["confusion_matrix"]))
    figures["confidence.png"] = png_bytes(figure_confidence(labels, probs))
    if history:
        figures["training_curves.png"] = png_bytes(figure_curves(history))
    return figures


FIGURE_CAPTIONS = {
    "training_curves.png": "Training curves per epoch (train and validation)",
    "confusion_matrix.png": "Confusion matrix: rows are the true class, columns the predicted one",
    "predictions.png": "Test predictions: predicted (confidence) vs true, mistakes in red",
    "mistakes.png": "The most confident mistakes",
    "confidence.png": "Confidence histogram and reliability diagram (calibration)",
    "train_sample.png": "A training sample with its label",
    "first_test.png": "The first test image with its predicted and true class",
}


STYLE = """<style>
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
.headline { display: flex; gap: 2em; flex-wrap: wrap; }
.card { border: 1px solid #ccc; border-radius: 8px; padding: 0.8em 1.2em; }
.big { font-size: 2.2em; font-weight: bold; }
.ok { color: #1a7f37; } .bad { color: #c62828; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 3px 9px;
  text-align: right; }
figure { margin: 1.5em 0; } img { max-width: 100%; } figcaption { color: #555; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
pre.text { white-space: pre-wrap; }
</style>"""


def _figure_html(figures: dict[str, bytes], name: str) -> str:
    import base64
    import html

    if name not in figures:
        return ""
    data = base64.b64encode(figures[name]).decode()
    return (
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(FIGURE_CAPTIONS.get(name, name))}</figcaption></figure>"
    )


def render_html(
    figures: dict[str, bytes],
    metrics: dict[str, Any],
    config: dict[str, Any] | None,
    sections: dict[str, tuple[str, str]] | None = None,
) -> str:
    """One self-contained page: every image embedded as base64, no external URL. `sections`:
    {html id: (title, Markdown text)}, shown as text before the config (the data statistics,
    the published version's model card)."""
    import html
    import json

    e = html.escape
    per_class = sorted(metrics["per_class"].items(), key=lambda kv: int(kv[0]))
    headline = _headline_html(metrics, per_class)
    rows = "".join(
        f"<tr><td>{k}</td><td>{m['precision']:.4f}</td><td>{m['recall']:.4f}</td>"
        f"<td>{m['f1']:.4f}</td><td>{m['support']}</td></tr>"
        for k, m in per_class
    )
    provenance = _provenance_html(metrics)
    settings = json.dumps(config, indent=2, sort_keys=True) if config else "(not recorded)"

    def img(name: str) -> str:
        return _figure_html(figures, name)

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>MNIST run {e(str(metrics.get("run_id", "")))}</title>
{STYLE}</head><body>
<h1>MNIST run <code>{e(str(metrics.get("run_id", "")))}</code></h1>
{headline}
{provenance}
{img("training_curves.png")}
<h2>Per class</h2>
<table id="per-class"><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>
<th>support</th></tr>{rows}</table>
{img("confusion_matrix.png")}
{img("predictions.png")}
{img("mistakes.png")}
{img("confidence.png")}
{img("train_sample.png")}
{img("first_test.png")}
{_sections_html(sections or {})}
<h2>Config</h2>
<pre id="config">{e(settings)}</pre>
</body></html>
"""


def _sections_html(sections: dict[str, tuple[str, str]]) -> str:
    import html

    return "\n".join(
        f'<h2>{html.escape(title)}</h2>\n<pre class="text" id="{html.escape(key)}">'
        f"{html.escape(text)}</pre>"
        for key, (title, text) in sections.items()
    )


def _headline_html(metrics: dict[str, Any], per_class: list[tuple[str, Any]]) -> str:
    """The cards at the top: accuracy, loss, the gate's decision, and where the model fails."""
    import html

    e = html.escape
    acc = metrics["test_accuracy"]
    errors = int(round((1 - acc) * metrics["test_examples"]))
    worst = min(per_class, key=lambda kv: kv[1]["f1"])
    confusion = np.asarray(metrics["confusion_matrix"])
    off = confusion - np.diag(np.diag(confusion))
    r, c = np.unravel_index(off.argmax(), off.shape)
    blessed = metrics.get("blessed")
    gate = (metrics.get("gate") or {}).get("reason", "")
    status = (
        "published as version " + str(metrics.get("published_version"))
        if blessed
        else "NOT published"
        if blessed is False
        else "not gated"
    )
    return f"""<div class="headline">
 <div class="card"><div>test accuracy</div><div class="big" id="test-accuracy">{acc:.4f}</div>
  <div>{errors} errors in {metrics["test_examples"]} test images</div></div>
 <div class="card"><div>test loss</div><div class="big">{metrics["test_loss"]:.4f}</div>
  <div>macro F1 {metrics.get("macro_f1", float("nan")):.4f}</div></div>
 <div class="card"><div>gate</div><div class="big {"ok" if blessed else "bad"}">{e(status)}</div>
  <div>{e(gate)}</div></div>
 <div class="card"><div>where it fails</div>
  <div>weakest class: <b>{worst[0]}</b> (F1 {worst[1]["f1"]:.4f})</div>
  <div>most common confusion: true <b>{r}</b> predicted as <b>{c}</b> ({off[r, c]} times)</div>
  <div>device: {e(str(metrics.get("device", "?")))}</div></div>
</div>"""


def _provenance_html(metrics: dict[str, Any]) -> str:
    """Which split every number comes from, the gate's comparison, and the infra validation."""
    import html

    e = html.escape
    examples = metrics.get("examples") or {}
    gate = metrics.get("gate") or {}
    infra = metrics.get("infra_validation") or {}
    parts = ["<h2>Where the numbers come from</h2><ul>"]
    if examples:
        held = (
            f"{examples['validation']} validation examples held out of the training split"
            if examples.get("validation")
            else "no validation examples (none held out: no validation curves)"
        )
        parts.append(
            f"<li>Training curves: {examples.get('train')} training examples and {held}. "
            f"Everything else on this page: the "
            f"<b>test split</b> ({examples.get('test')} examples), read once after training, "
            f"through the <b>exported SavedModel</b>.</li>"
        )
    if infra:
        parts.append(
            f'<li id="infra">Infra validation: loaded as TF Serving loads it, '
            f"{infra.get('warmup_records_replayed')} warmup records replayed, signatures "
            f"{e(', '.join(infra.get('signatures', [])))}; outputs within "
            f"{infra.get('max_abs_difference_vs_trained_model', float('nan')):.1e} of the "
            f"trained model ({infra.get('seconds', 0):.1f} s).</li>"
        )
    u = metrics.get("uncertainty") or {}
    if u.get("accuracy_flagged") is not None:
        how = threshold_origin(u)
        others = (
            f"{u['accuracy_unflagged']:.4f} on the others"
            if u.get("accuracy_unflagged") is not None
            else "none left unflagged"
        )
        parts.append(
            f'<li id="uncertainty">Unsure predictions (top probability below '
            f"{u['threshold']:.3f}, {how}, stored in the exported model): "
            f"{u['flagged_fraction']:.1%} of test predictions are flagged; "
            f"accuracy {u['accuracy_flagged']:.3f} on the flagged, {others}; "
            f"{percent(u.get('mistakes_flagged') or 0)} of the mistakes are flagged.</li>"
        )
    if gate.get("baseline_version") is not None:
        parts.append(
            f'<li id="gate">Gate vs version {gate["baseline_version"]} on the same '
            f"{gate.get('test_examples')} examples: {gate.get('accuracy', 0):.4f} vs "
            f"{gate.get('baseline_accuracy', 0):.4f}; {gate.get('candidate_only_wrong')} newly "
            f"wrong, {gate.get('baseline_only_wrong')} newly right; McNemar p = "
            f"{gate.get('p_value', 1):.3g} (significance {gate.get('significance')}).</li>"
        )
    elif gate:
        parts.append(f'<li id="gate">Gate: {e(str(gate.get("reason")))}</li>')
    parts.append("</ul>")
    return "".join(parts)


def write_report(
    report_dir: Path,
    predictions: dict[str, np.ndarray],
    metrics: dict[str, Any],
    history: dict[str, list[float | None]] | None = None,
    config: dict[str, Any] | None = None,
    figures: dict[str, bytes] | None = None,
    sections: dict[str, tuple[str, str]] | None = None,
) -> list[Path]:
    """Write every figure as a PNG and index.html embedding them; return the paths written.
    `figures`: already drawn by `build_figures` from these predictions and history;
    `sections`: text sections of the page (`render_html`)."""
    from components.files import folder

    report_dir = folder(report_dir)  # (`make report` refuses a file there before coming here)
    if figures is None:
        figures = build_figures(predictions, metrics, history)
    files = {**figures, "index.html": render_html(figures, metrics, config, sections).encode()}
    written = []
    for name, data in files.items():
        path, tmp = report_dir / name, report_dir / f".tmp-{name}"
        try:  # each file whole or not at all (a full disk leaves no 0-byte figure)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise ReportWriteError(e.errno, f"could not write {path}: {e.strerror or e}") from None
        written.append(path)
    return written


class ReportWriteError(OSError):
    """Writing the report failed (a full disk, a read-only folder); what was written is whole."""


def threshold_origin(uncertainty: dict[str, Any]) -> str:
    """Where the `uncertain` threshold of a run's metrics came from, for people (the console
    and the report say it alike)."""
    if uncertainty.get("calibrated", True):
        return "calibrated on the validation split"
    return "a fixed threshold: no validation split to calibrate on"


class MetricsError(ValueError):
    """A field of a run's metrics that the report reads is missing, of the wrong type or out
    of range. Python's json reads any JSON (null, "0.9", true, NaN): unchecked, such a value is
    a traceback deep in the drawing, or a figure drawn from it (a string as a tick label)."""


CLASSES = [str(c) for c in range(10)]  # the keys of per_class, the rows of the confusion matrix
_ABSENT = object()  # a field the metrics do not hold
Check = Callable[[Any, str], object]


def check_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """Check every field of a run's metrics (read from `path`) that the report reads, before
    anything is drawn: a MetricsError naming the file, the field and what was expected, so
    `make report` says so in one line and leaves the previous report as it was."""
    try:
        _fields(metrics, "", _RESULTS, required=True)
        _check_per_class(metrics.get("per_class", _ABSENT))
        _check_confusion(metrics.get("confusion_matrix", _ABSENT), metrics["test_examples"])
        _fields(metrics, "", _RUN, required=False)
        gate = _section(metrics, "gate")
        _fields(gate, "gate.", _GATE, required=False)
        if gate.get("baseline_version") is not None:  # the comparison is shown, every figure
            _fields(gate, "gate.", _VERSUS_BASELINE, required=True)
        _fields(_section(metrics, "examples"), "examples.", _EXAMPLES, required=False)
        _fields(_section(metrics, "infra_validation"), "infra_validation.", _INFRA, required=False)
        uncertainty = _section(metrics, "uncertainty")
        _fields(uncertainty, "uncertainty.", _UNCERTAINTY, required=False)
        if uncertainty.get("accuracy_flagged") is not None:  # shown, with its threshold
            _fields(uncertainty, "uncertainty.", _FLAGGED, required=True)
        _check_history(_section(metrics, "history"))
    except MetricsError as e:
        raise MetricsError(f"{path}: {e}") from None


def _bad(field: str, value: Any, expected: str) -> MetricsError:
    """The error for one field, its value as JSON spells it (null, "x", true, NaN), cut short."""
    if value is _ABSENT:
        return MetricsError(f"{field} is missing, expected {expected}")
    try:
        shown = json.dumps(value, default=repr)
    except RecursionError:
        shown = f"a nested {type(value).__name__}"
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return MetricsError(f"{field} is {shown}, expected {expected}")


def _fields(section: dict[str, Any], prefix: str, spec: dict[str, Check], required: bool) -> None:
    """Check the fields of `spec` in `section`. Not `required`: one it lacks is fine (the
    report shows a default), one it holds is drawn, so must be what it claims to be."""
    for key, check in spec.items():
        if required or key in section:
            check(section.get(key, _ABSENT), prefix + key)


def _section(metrics: dict[str, Any], key: str) -> dict[str, Any]:
    """An optional part of the metrics (the gate's decision, the history): absent or null is
    none (the report leaves it out); anything else must be a JSON object."""
    value = metrics.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(key, value, "an object or null")
    return value


def _is_number(value: Any) -> bool:
    """A finite real number: not a bool (true is no accuracy), not NaN or Infinity (which
    Python's json reads). A whole number too big for a float is finite all the same."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _number(value: Any, field: str, low: float = -math.inf, high: float = math.inf) -> object:
    if not (_is_number(value) and low <= value <= high):
        bounds = f" in [{low:g}, {high:g}]" if high < math.inf else f" >= {low:g}"
        raise _bad(field, value, "a number" + (bounds if low > -math.inf else ""))
    return value


def _count(value: Any, field: str, low: int = 0) -> object:
    """A whole number >= low (examples, a confusion cell): 2.0 and true are no counts."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _bad(field, value, f"a whole number >= {low}")
    return value


def _text(value: Any, field: str) -> object:
    if not isinstance(value, str):
        raise _bad(field, value, "a string")
    return value


def _flag(value: Any, field: str) -> object:
    if not isinstance(value, bool):
        raise _bad(field, value, "true or false")
    return value


def _texts(value: Any, field: str) -> object:
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise _bad(field, value, "a list of strings")
    return value


def _or_null(check: Check) -> Check:
    """`check`, with null allowed: the report reads it as none (no baseline, not published)."""
    return lambda value, field: None if value is None else check(value, field)


def _check_per_class(per_class: Any) -> None:
    """One row per class, "0" to "9": precision, recall and F1 in [0, 1], support a count."""
    expected = 'an object with the classes "0" to "9"'
    if not isinstance(per_class, dict):
        raise _bad("per_class", per_class, expected)
    if sorted(per_class) != CLASSES:
        raise MetricsError(f"per_class holds the classes {sorted(per_class)}, expected {expected}")
    for c in CLASSES:
        row = per_class[c]
        if not isinstance(row, dict):
            raise _bad(f"per_class.{c}", row, "an object with precision, recall, f1, support")
        _fields(row, f"per_class.{c}.", _CLASS_ROW, required=True)


def _check_confusion(confusion: Any, examples: int) -> None:
    """10 rows of 10 counts (true class by predicted class) that add up to test_examples: the
    headline's errors and most common confusion are read from both."""
    if not (isinstance(confusion, list) and len(confusion) == len(CLASSES)):
        raise _bad("confusion_matrix", confusion, "10 rows of 10 counts")
    for r, row in enumerate(confusion):
        if not (isinstance(row, list) and len(row) == len(CLASSES)):
            raise _bad(f"confusion_matrix[{r}]", row, "a row of 10 counts")
        for c, value in enumerate(row):
            _count(value, f"confusion_matrix[{r}][{c}]")
    total = sum(map(sum, confusion))
    if total != examples:
        raise MetricsError(
            f"confusion_matrix counts {total} examples, expected test_examples ({examples})"
        )


def _check_history(history: dict[str, Any]) -> None:
    """Each log a list of per-epoch numbers (null: an epoch whose logs were lost with a damaged
    backup), all of one length: they are drawn against the same epochs."""
    lengths = {}
    for key, values in history.items():
        if not isinstance(values, list):
            raise _bad(f"history.{key}", values, "a list of numbers, one per epoch")
        for i, value in enumerate(values):
            if value is not None and not _is_number(value):
                raise _bad(f"history.{key}[{i}]", value, "a number, or null for a lost epoch")
        lengths[key] = len(values)
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{k} {n}" for k, n in lengths.items())
        raise MetricsError(
            f"history holds logs of different lengths ({shown}), expected one "
            f"value per epoch in each"
        )


_FRACTION = functools.partial(_number, low=0.0, high=1.0)
_NON_NEGATIVE = functools.partial(_number, low=0.0)
_VERSION = functools.partial(_count, low=1)
_RESULTS: dict[str, Check] = {
    "test_accuracy": _FRACTION,
    "test_loss": _NON_NEGATIVE,
    "test_examples": functools.partial(_count, low=1),
}
_CLASS_ROW: dict[str, Check] = {
    "precision": _FRACTION,
    "recall": _FRACTION,
    "f1": _FRACTION,
    "support": _count,
}
_RUN: dict[str, Check] = {
    "macro_f1": _FRACTION,
    "run_id": _text,
    "device": _text,
    "blessed": _or_null(_flag),
    "published_version": _or_null(_VERSION),
    "published_path": _or_null(_text),
}
_VERSUS_BASELINE: dict[str, Check] = {
    "baseline_accuracy": _FRACTION,
    "candidate_only_wrong": _count,
    "baseline_only_wrong": _count,
    "p_value": _FRACTION,
}
_GATE: dict[str, Check] = {
    "reason": _text,
    "baseline_version": _or_null(_VERSION),
    "test_examples": _count,
    "accuracy": _FRACTION,
    "significance": _FRACTION,
    **{k: _or_null(check) for k, check in _VERSUS_BASELINE.items()},
}
_EXAMPLES: dict[str, Check] = {"train": _count, "validation": _count, "test": _count}
_INFRA: dict[str, Check] = {
    "passed": _flag,
    "reason": _text,
    "warmup_records_replayed": _count,
    "signatures": _texts,
    "max_abs_difference_vs_trained_model": _NON_NEGATIVE,
    "seconds": _NON_NEGATIVE,
}
_FLAGGED: dict[str, Check] = {"threshold": _FRACTION, "flagged_fraction": _FRACTION}
_UNCERTAINTY: dict[str, Check] = {
    **_FLAGGED,
    "accuracy_flagged": _or_null(_FRACTION),
    "accuracy_unflagged": _or_null(_FRACTION),
    "mistakes_flagged": _or_null(_FRACTION),
    "calibrated": _flag,
}


def percent(p: float) -> str:
    """A probability as a whole percentage that never rounds up to a certainty it is not:
    0.99996 is ">99%", not "100%" (a confident mistake must not read as certain)."""
    if 0.995 <= p < 1.0:
        return ">99%"
    return f"{p:.0%}"
