"""Exporter: SavedModel with the serving contract, warmup records, publish gate, atomic versions.

A version folder appears under the models base path only when complete: it is written under a
non-numeric temporary name (TF Serving ignores those) and renamed into place, all under a file
lock so that concurrent runs get distinct, strictly increasing versions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from components import files
from components.data import IMAGE_SHAPE, preprocess
from components.files import file_digests, write_manifest

log = logging.getLogger(__name__)

MODEL_NAME = "mnist"
TMP_PREFIX = ".tmp-"
LOCK_FILE = ".publish.lock"
HIGHEST_FILE = ".highest_version"  # the highest version number ever published here
WARMUP_FILE = "tf_serving_warmup_requests"
METRICS_FILE = "metrics.json"


class PublishError(RuntimeError):
    """Export or publish failed; nothing was published."""


# --------------------------------------------------------------------------------------------
# The serving graph


def _check_images(images: tf.Tensor) -> tf.Tensor:
    """TF Serving feeds whatever a request holds (the declared shape is not enforced there), so
    the graph checks it at run time and fails with InvalidArgument.

    The check reads the shape of a copy whose static shape is unknown (serialize -> parse):
    checked directly, TensorFlow folds it away using the declared [None, 28, 28] shape.
    """
    opaque = tf.io.parse_tensor(tf.io.serialize_tensor(images), tf.uint8)
    shape = tf.shape(opaque)
    padded = tf.concat([shape, [0, 0, 0]], 0)  # so [1:3] exists for any rank
    ok = tf.logical_and(
        tf.equal(tf.size(shape), 3), tf.reduce_all(tf.equal(padded[1:3], IMAGE_SHAPE))
    )
    with tf.control_dependencies(
        [tf.debugging.Assert(ok, ["images must be uint8 [N, 28, 28]; got shape", shape])]
    ):
        return tf.identity(images)


def _decode_image(data: tf.Tensor) -> tf.Tensor:
    """predict_png's decoding of one image: 28x28, grayscale by luminance."""
    image = tf.io.decode_image(data, channels=1, dtype=tf.uint8, expand_animations=False)
    shape = tf.shape(image)
    with tf.control_dependencies(
        [
            tf.debugging.Assert(
                tf.reduce_all(tf.equal(shape[:2], IMAGE_SHAPE)),
                ["image must be 28x28 pixels; got", shape[:2]],
            )
        ]
    ):
        return tf.reshape(image, IMAGE_SHAPE)


def _decode_pngs(image_bytes: tf.Tensor) -> tf.Tensor:
    """predict_png's images: uint8 [N, 28, 28], each decoded alone, none transparent."""
    images = tf.map_fn(
        _decode_image, image_bytes, fn_output_signature=tf.TensorSpec(IMAGE_SHAPE, tf.uint8)
    )
    with tf.control_dependencies([_opaque(image_bytes)]):
        return tf.identity(images)


def _opaque(image_bytes: tf.Tensor) -> tf.Tensor:
    """An Assert that no image of the batch has transparent pixels. A transparent pixel has no
    colour of its own: such an image (a drawing canvas's export) is refused by predict_png, not
    read with its alpha dropped (a dark digit on a transparent page would come out blank);
    predict_image composites it as the client does (components/photo.py).

    Only a PNG whose header allows transparency (an alpha channel: colour type 4 or 6; or a
    tRNS chunk) is decoded again, as RGBA (as predict_image decodes it), to look at its alpha:
    the usual opaque grayscale PNG costs two string tests, for the whole batch at once.
    (TensorFlow's GIF decoder has no transparency; BMP and JPEG have none it reads.)"""
    from components.photo import decode_png_rgba

    png = tf.equal(tf.strings.substr(image_bytes, 0, 8), b"\x89PNG\r\n\x1a\n")
    colour = tf.strings.substr(image_bytes, 25, 1)  # the IHDR's colour type
    may = tf.logical_and(
        png,
        tf.logical_or(
            tf.logical_or(tf.equal(colour, b"\x04"), tf.equal(colour, b"\x06")),
            tf.strings.regex_full_match(image_bytes, r"\C*tRNS\C*"),  # \C: any byte
        ),
    )
    opaque = tf.map_fn(
        lambda data: tf.reduce_all(tf.equal(decode_png_rgba(data)[..., 3], 255)),
        tf.boolean_mask(image_bytes, may),
        fn_output_signature=tf.bool,
    )
    return tf.debugging.Assert(
        tf.reduce_all(opaque),
        [
            "image has transparent pixels: predict_png takes opaque 28x28 MNIST-format images "
            "(a light digit on black); send it to predict_image, which composites transparency "
            "as the client does"
        ],
    )


def build_export_archive(
    model: keras.Model, uncertainty_threshold: float = 0.0
) -> keras.export.ExportArchive:
    """The exported graph: the shared preprocess + the model, behind the contract's signatures.

    Every signature also answers `uncertain` (bool [N]): the top probability is below the
    threshold calibrated on the validation split at training time, a constant of the graph, so
    a served model and its report agree.

    Keras's ExportArchive (rather than a bare tf.Module holding the model) is what makes the
    variables restorable by the graph-level loader that TF Serving's C++ server uses.
    """
    threshold = tf.constant(uncertainty_threshold, tf.float32, name="uncertainty_threshold")

    def predict(images: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = tf.cast(model(preprocess(images), training=False), tf.float32)
        return {
            "probabilities": probabilities,
            "class_ids": tf.argmax(probabilities, axis=-1, output_type=tf.int64),
            "uncertain": tf.reduce_max(probabilities, axis=-1) < threshold,
        }

    def serve_images(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return predict(_check_images(images))

    def serve_png(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        return predict(_decode_pngs(image_bytes))

    from components.photo import normalize_photos

    # Traced once: Keras and then the SavedModel saver trace the endpoint (in two contexts),
    # which would trace a tf.function inside it twice too (0.5 s each); this is only called.
    normalize = normalize_photos.get_concrete_function()

    def serve_photo(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        # Photos of any size -> MNIST's 28x28 in the graph (components/photo.py), then the
        # same preprocess + model as the other signatures.
        return predict(normalize(image_bytes))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        serve_images,
        input_signature=[tf.TensorSpec([None, *IMAGE_SHAPE], tf.uint8, name="images")],
    )
    archive.add_endpoint(
        "predict_png",
        serve_png,
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
    )
    archive.add_endpoint(
        "predict_image",
        serve_photo,
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
    )
    return archive


def write_warmup(path: Path, model_name: str = MODEL_NAME) -> None:
    """A few PredictionLog records per signature, which TF Serving replays on load."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    from components.photo import example_photos

    blank = np.zeros((1, *IMAGE_SHAPE), np.uint8)
    stroke = blank.copy()
    stroke[0, 4:24, 13:15] = 255  # a "1"
    batches = [blank, stroke, np.concatenate([blank, stroke] * 4)]
    photos = example_photos()  # photo-like JPEG/PNG digits of a few sizes (no blank page)
    requests = []
    for batch in batches:
        requests.append(("serving_default", "images", tf.make_tensor_proto(batch)))
        pngs = [tf.io.encode_png(img[..., None]).numpy() for img in batch]
        requests.append(
            (
                "predict_png",
                "image_bytes",
                tf.make_tensor_proto(pngs, dtype=tf.string, shape=[len(pngs)]),
            )
        )
    for blobs in ([photos[0]], photos):
        requests.append(
            (
                "predict_image",
                "image_bytes",
                tf.make_tensor_proto(blobs, dtype=tf.string, shape=[len(blobs)]),
            )
        )
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, input_name, tensor in requests:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
            )
            request.inputs[input_name].CopyFrom(tensor)
            log_record = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log_record.SerializeToString())


UNCERTAINTY_FILE = "uncertainty.json"


def export_saved_model(
    model: keras.Model,
    export_dir: Path,
    metrics: dict[str, Any] | None = None,
    uncertainty: dict[str, Any] | None = None,
) -> Path:
    """Write a complete SavedModel (signatures, warmup, metrics) into `export_dir`.

    `uncertainty`: the calibration ({"threshold": t, ...}); without one nothing is flagged."""
    threshold = float((uncertainty or {}).get("threshold", 0.0))
    build_export_archive(model, threshold).write_out(str(export_dir), verbose=False)
    extra = Path(export_dir) / "assets.extra"
    extra.mkdir(exist_ok=True)
    write_warmup(extra / WARMUP_FILE)
    (extra / UNCERTAINTY_FILE).write_text(
        json.dumps(uncertainty or {"threshold": threshold}, indent=2) + "\n"
    )
    if metrics is not None:
        (extra / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return Path(export_dir)


# --------------------------------------------------------------------------------------------
# Versions, gate, publish


def published_versions(base: Path) -> list[int]:
    """Complete versions under `base`, ascending: folders named by a version number as this
    product writes it (no leading zero)."""
    if not Path(base).is_dir():
        return []
    return sorted(
        int(p.name)
        for p in Path(base).iterdir()
        if p.is_dir() and p.name.isdigit() and p.name == str(int(p.name)) and int(p.name) > 0
    )


def _next_version(base: Path, latest: int | None, remembered: set[int]) -> int:
    """After the latest version, after any other entry with a number for a name (a file "4", a
    folder "007" that TF Serving would read as version 7), after the highest number published
    here (HIGHEST_FILE) and after the `remembered` ones (those labels point at or remember): a
    version number is never given to a second model. A TF Serving that loaded a version deleted
    since would not load another model under its number, and a label still pointing at it would
    move to a model nobody promoted."""
    taken = [int(p.name) for p in Path(base).iterdir() if p.name.isascii() and p.name.isdigit()]
    return max([latest or 0, *taken, *_highest_published(base), *remembered]) + 1


def _highest_published(base: Path) -> list[int]:
    """[the highest version number ever published under `base`] as HIGHEST_FILE has it, or []."""
    try:
        return [int(files.read_regular(base / HIGHEST_FILE).decode())]
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:  # (UnicodeDecodeError is a ValueError)
        log.warning(
            "%s is unreadable (%s): numbering after the versions and labels", base / HIGHEST_FILE, e
        )
        return []


def latest_version_dir(base: Path) -> Path | None:
    versions = published_versions(base)
    return Path(base) / str(versions[-1]) if versions else None


# The regression check's significance: a candidate is refused for a drop beyond --max-regression
# only when McNemar's exact one-sided test on the two models' per-example correctness says the
# drop is unlikely to be noise (p < SIGNIFICANCE).
SIGNIFICANCE = 0.05


def mcnemar_p(candidate_only_wrong: int, baseline_only_wrong: int) -> float:
    """One-sided exact McNemar test: the probability, if both models were equally good, that of
    the n examples exactly one of them gets wrong, the candidate gets at least this many."""
    n = candidate_only_wrong + baseline_only_wrong
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(candidate_only_wrong, n + 1)) / 2**n


@dataclasses.dataclass(frozen=True)
class GateDecision:
    blessed: bool
    reason: str
    accuracy: float
    test_examples: int
    full_test_split: bool
    baseline_version: int | None = None
    baseline_accuracy: float | None = None
    candidate_only_wrong: int | None = None
    baseline_only_wrong: int | None = None
    p_value: float | None = None
    significance: float = SIGNIFICANCE
    forced_partial_test: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def gate(
    candidate_correct: np.ndarray,
    *,
    full_test_split: bool,
    min_accuracy: float,
    max_regression: float,
    allow_partial_test: bool = False,
    baseline_correct: np.ndarray | None = None,
    baseline_version: int | None = None,
) -> GateDecision:
    """TFX-Evaluator-style blessing of the exported model, from per-example correctness on the
    test examples (the baseline's on the same examples, in the same validation process)."""
    n = int(len(candidate_correct))
    accuracy = float(np.mean(candidate_correct)) if n else float("nan")
    common: dict[str, Any] = dict(
        accuracy=accuracy, test_examples=n, full_test_split=full_test_split
    )
    if not full_test_split and not allow_partial_test:
        return GateDecision(
            False,
            f"evaluated on {n} test examples, not the whole test split "
            f"(--max-test-examples): a smoke run is never published "
            f"(--publish-partial-test forces it)",
            **common,
        )
    common["forced_partial_test"] = not full_test_split
    if not accuracy >= min_accuracy:  # also refuses NaN
        return GateDecision(
            False,
            f"test accuracy {accuracy:.4f} is below --min-accuracy {min_accuracy:.4f}",
            **common,
        )
    if baseline_correct is None:
        return GateDecision(
            True,
            f"test accuracy {accuracy:.4f} >= {min_accuracy:.4f}; first version, no baseline",
            **common,
        )
    return _versus_baseline(
        candidate_correct, baseline_correct, baseline_version, max_regression, min_accuracy, common
    )


def _versus_baseline(
    candidate_correct: np.ndarray,
    baseline_correct: np.ndarray,
    baseline_version: int | None,
    max_regression: float,
    min_accuracy: float,
    common: dict[str, Any],
) -> GateDecision:
    """The regression check: refused only when the candidate is more than `max_regression`
    below the baseline on the same examples *and* McNemar's test says that is not noise."""
    n, accuracy = int(len(candidate_correct)), float(np.mean(candidate_correct))
    base_acc = float(np.mean(baseline_correct))
    worse = int(np.sum(~candidate_correct & baseline_correct))
    better = int(np.sum(candidate_correct & ~baseline_correct))
    p = mcnemar_p(worse, better)
    common = dict(
        common,
        baseline_version=baseline_version,
        baseline_accuracy=base_acc,
        candidate_only_wrong=worse,
        baseline_only_wrong=better,
        p_value=p,
    )
    versus = (
        f"version {baseline_version}'s {base_acc:.4f} on the same {n} examples "
        f"({worse} newly wrong, {better} newly right, McNemar p={p:.3g})"
    )
    # Counted, not subtracted: 20 more wrong of 10,000 is a drop of exactly 0.002, which the
    # difference of two float accuracies can put a hair above or below --max-regression.
    drop = (worse - better) / n
    over = worse - better > max_regression * n + 1e-9
    if over and p < SIGNIFICANCE:
        return GateDecision(
            False,
            f"test accuracy {accuracy:.4f} is {drop:.4f} below {versus}: more than "
            f"--max-regression {max_regression:.4f}, and significant (p < {SIGNIFICANCE})",
            **common,
        )
    if drop <= 0:
        regression = f"not below {versus}"
    elif not over:
        regression = f"{drop:.4f} below {versus}: within --max-regression {max_regression:.4f}"
    else:
        regression = (
            f"{drop:.4f} below {versus}: more than --max-regression {max_regression:.4f} but "
            f"not significant (p >= {SIGNIFICANCE})"
        )
    return GateDecision(
        True, f"test accuracy {accuracy:.4f} >= {min_accuracy:.4f}, {regression}", **common
    )


@contextlib.contextmanager
def publish_lock(base: Path) -> Iterator[None]:
    """An exclusive lock on the models folder, held while a version is chosen and written."""
    base.mkdir(parents=True, exist_ok=True)
    try:
        handle = files.open_lock(base / LOCK_FILE)
    except files.NotARegularFile as e:
        raise PublishError(files.lock_refusal(e, "the publish lock", base / LOCK_FILE)) from None
    with files.holding(handle):
        yield


def remove_leftovers(base: Path) -> list[str]:
    """Delete temporary folders left by killed exports. Call with the publish lock held: only
    the lock holder writes temporary folders, so any found then belongs to a dead run."""
    removed = []
    if Path(base).is_dir():
        for p in Path(base).iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    if removed:
        log.warning("removed leftovers of interrupted exports: %s", ", ".join(sorted(removed)))
    return removed


class BaselineMoved(RuntimeError):
    """Another run published a version after this one's baseline was evaluated."""

    def __init__(self, latest: int):
        super().__init__(f"version {latest} was published meanwhile")
        self.latest = latest


@dataclasses.dataclass(frozen=True)
class PublishResult:
    version: int
    path: Path
    pruned: list[int]


def publish_staged(
    staged: Path,
    base: Path,
    *,
    run_id: str,
    baseline_version: int | None,
    assets: dict[str, str | bytes] | Callable[[int], dict[str, str | bytes]],
    remembered: Callable[[], set[int]],
    keep_versions: int = 0,
    protected: Callable[[], set[int]] | None = None,
) -> PublishResult:
    """Copy a validated, blessed staged SavedModel in as the next version, atomically.

    Under the publish lock: `baseline_version` must still be the latest version (else
    BaselineMoved: the caller gates again against the new one); the copy is written under a
    non-numeric name with `assets` (or `assets(version)`) added to assets.extra/, fsynced, and
    renamed into place. `protected()` (versions pruning keeps) and `remembered()` (numbers never
    given again) are read under the lock: the serving side's labels, which `models promote`
    writes under it too.
    """
    base = Path(base)
    with publish_lock(base):
        remove_leftovers(base)
        versions = published_versions(base)
        latest = versions[-1] if versions else None
        if latest != baseline_version:
            raise (
                BaselineMoved(latest)
                if latest is not None
                else PublishError(f"baseline version {baseline_version} disappeared from {base}")
            )
        version = _next_version(base, latest, remembered())
        tmp, final = base / f"{TMP_PREFIX}{run_id}", base / str(version)
        try:
            _write_version(staged, tmp, assets(version) if callable(assets) else assets)
            with files.atomic_write(base / HIGHEST_FILE, "w", sync=True) as f:
                f.write(f"{version}\n")
            os.rename(tmp, final)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise PublishError(
                    f"could not write version {version} under {base}: {files.os_error_text(e)}"
                ) from e
            raise
        pruned: list[int] = []
        if keep_versions:
            try:  # read under the lock: `models promote` takes it too
                pruned = prune_versions(base, keep_versions, protected() if protected else None)
            except OSError as e:  # the version is published; pruning is housekeeping
                log.warning("could not prune old versions under %s: %s", base, e)
    return PublishResult(version, final, pruned)


def _write_version(staged: Path, tmp: Path, extras: dict[str, str | bytes]) -> None:
    """`staged` copied to `tmp` (read back: what was validated), `extras` added to its
    assets.extra/, the manifest written, everything fsynced: ready to be renamed into place."""
    shutil.copytree(staged, tmp)
    copied = file_digests(tmp)
    if copied != file_digests(staged):
        raise PublishError(f"the copy of {staged} in {tmp} differs from it (disk?)")
    extra = tmp / "assets.extra"
    extra.mkdir(exist_ok=True)
    for name, content in extras.items():
        (extra / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    # what `make predict`, `models list` and the next gate verify (assets.extra/ files written
    # just now are hashed; the copied ones were, a moment ago)
    rewritten = {f"assets.extra/{name}" for name in extras}
    write_manifest(tmp, known={k: v for k, v in copied.items() if k not in rewritten})
    _fsync_tree(tmp)


def version_of_run(base: Path, run_id: str) -> int | None:
    """The published version a run wrote, if any (a run killed after its rename)."""
    for v in reversed(published_versions(base)):
        try:
            value = json.loads((Path(base) / str(v) / "assets.extra" / METRICS_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(value, dict) and value.get("run_id") == run_id:
            return v
    return None


def prune_versions(base: Path, keep: int, protected: set[int] | None = None) -> list[int]:
    """Keep the newest `keep` versions and every `protected` one (a label points at it); delete
    the rest (renamed away first, so TF Serving never sees a half-deleted version)."""
    versions = published_versions(base)
    doomed = [
        v
        for v in (versions[:-keep] if keep < len(versions) else [])
        if v not in (protected or set())
    ]
    for v in doomed:
        trash = base / f"{TMP_PREFIX}pruned-{v}"
        os.rename(base / str(v), trash)
        shutil.rmtree(trash, ignore_errors=True)
    if doomed:
        log.info("pruned versions %s (keeping %d)", doomed, keep)
    return doomed


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
