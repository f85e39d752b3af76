"""Prediction clients: a SavedModel in-process, TF Serving over REST, TF Serving over gRPC.

All three offer the three signatures: `predict` (uint8 images [N, 28, 28] -> serving_default),
`predict_encoded` (28x28 PNGs -> predict_png) and `predict_photos` (photos of any size ->
predict_image, normalised in the graph), and return a Prediction; server failures become
ServerError with a message a person can act on.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from serving.inputs import InputError

MODEL_NAME = "mnist"


class ServerError(RuntimeError):
    """The server refused, failed, or could not be reached."""


class Refusal(ServerError):
    """The model refused the request's inputs (InvalidArgument in the graph: HTTP 400 from TF
    Serving's REST API, INVALID_ARGUMENT over gRPC); `reason` is the graph's message."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Prediction:
    probabilities: np.ndarray  # float32 [N, 10]
    class_ids: np.ndarray  # int64 [N]
    outputs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # every output

    @property
    def uncertain(self) -> np.ndarray | None:
        """bool [N] when the model says which predictions it is unsure of, else None."""
        value = self.outputs.get("uncertain")
        return None if value is None else np.asarray(value, bool).reshape(-1)

    @classmethod
    def from_outputs(cls, outputs: dict[str, Any]) -> Prediction:
        arrays = {k: np.asarray(v) for k, v in outputs.items()}
        return cls(
            arrays["probabilities"].astype(np.float32),
            arrays["class_ids"].astype(np.int64).reshape(-1),
            arrays,
        )


def latest_version(base: Path) -> Path:
    from serving.versions import published

    numbers = published(Path(base))
    if not numbers:
        raise ServerError(f"no published model under {base} (run `make train` first)")
    return Path(base) / str(numbers[-1])


def damaged_message(path: Path, damaged: list[str]) -> str:
    """One line for a published version whose files differ from their recorded SHA-256, or
    whose record of them (the manifest) cannot be read."""
    from components.files import VERSION_MANIFEST

    invalid = f"{VERSION_MANIFEST} (invalid: "
    if damaged and damaged[0].startswith(invalid):
        reason = damaged[0][len(invalid) :]  # (its closing parenthesis included)
        what = f"{VERSION_MANIFEST}, the record of its files' SHA-256, is invalid ({reason}"
        why = "so its files cannot be checked against the model that was validated"
    else:
        shown = ", ".join(damaged[:3]) + (
            f" and {len(damaged) - 3} more" if len(damaged) > 3 else ""
        )
        verb = "no longer matches" if len(damaged) == 1 else "no longer match"
        what = f"{shown} {verb} the SHA-256 recorded when it was published"
        why = "so it is not the model that was validated"
    return (
        f"{path} is damaged: {what}, {why}. Delete that folder and publish again (if a label "
        f"points at it, first move it: `python -m pipeline models promote N` for stable, "
        f"`models canary N` or `models canary none` for canary)"
    )


class FlagError(InputError):
    """A flag that cannot be used as given (--local, --version or --label naming no model, a
    --show path that cannot be written): a usage error, like a bad input."""


def local_model_dir(path: Path, version: int | None = None, label: str | None = None) -> Path:
    """The SavedModel an in-process (--local) request runs, chosen as TF Serving chooses it
    from a models base folder: `version`, or the version `label` points to (`python -m pipeline
    models`), or, for a plain request, the newest version served: the newest labelled one when
    labels are set (the `specific` policy of models.config), else the latest."""
    from serving import versions

    path = Path(path)
    if version is not None and label is not None:
        raise FlagError("give --version or --label, not both")
    problem = versions.not_a_folder(path)
    if problem:
        raise FlagError(f"--local: {problem}: give a SavedModel or a models folder")
    if not path.exists() and path.name.isdigit() and path.parent.is_dir():
        published = versions.published(path.parent)  # a version folder named that is not there
        if published:
            raise FlagError(
                f"no version {path.name} under {path.parent} (published: "
                f"{', '.join(map(str, published))})"
            )
    if (path / "saved_model.pb").is_file():
        if version is not None or label is not None:
            raise FlagError(
                f"{path} is one SavedModel: --version and --label choose among the versions "
                f"of a models base folder (e.g. {path.parent})"
            )
        return path
    if version is None:
        return _served_dir(path, label)
    chosen = path / str(version)
    if not (chosen / "saved_model.pb").is_file():
        published = versions.published(path) if path.is_dir() else []
        raise FlagError(
            f"no version {version} under {path} (published: "
            f"{', '.join(map(str, published)) or 'none'})"
            + ("; that folder has no saved_model.pb" if version in published else "")
        )
    return chosen


def _served_dir(path: Path, label: str | None) -> Path:
    """The version `label` points to, or for a plain request (None) the newest labelled one
    or else the latest; a label that points at a version that is gone or incomplete says so
    and how to move it."""
    from serving import versions

    try:
        labels = versions.read_labels(path)
    except versions.VersionError as e:
        raise ServerError(str(e)) from None
    if label is not None and labels.get(label) is None:
        raise FlagError(
            f"no version is labelled {label!r} under {path} (the labels are "
            f"{' and '.join(versions.LABELS)}, set with `python -m pipeline models promote N` "
            f"and `... canary N`)"
        )
    served = {labels[k]: k for k in reversed(versions.LABELS) if labels[k] is not None}
    if label is None and not served:
        return _complete(path, latest_version(path), "the latest, no label is set")
    version = labels[label] if label is not None else max(served)
    key = label or served[version]
    move = (
        "`python -m pipeline models canary none` clears it"
        if key == "canary"
        else "`python -m pipeline models rollback` or `... models promote N` moves it"
    )
    if version not in versions.published(path):
        raise ServerError(
            f"label {key} points at version {version}, which is not published under {path} "
            f"(published: {', '.join(map(str, versions.published(path))) or 'none'}): {move}"
        )
    return _complete(path, path / str(version), f"labelled {key}", move)


def _complete(path: Path, chosen: Path, why: str, move: str | None = None) -> Path:
    """`chosen` when it holds a SavedModel's graph (what is in it is checked on loading)."""
    if (chosen / "saved_model.pb").is_file():
        return chosen
    raise ServerError(
        f"version {chosen.name} ({why}) under {path} is incomplete: no saved_model.pb; "
        + (move or "delete that folder, or label a version with `python -m pipeline models`")
    )


class LocalPredictor:
    """Runs a SavedModel's signatures in-process: no server."""

    def __init__(self, saved_model_dir: Path):
        import tensorflow as tf

        from components.files import damaged_files

        path = Path(saved_model_dir)
        if not (path / "saved_model.pb").is_file():
            path = latest_version(path)  # a models base folder: take its latest version
        self.path = path
        self._tf = tf
        damaged = damaged_files(path)
        if damaged:
            raise ServerError(damaged_message(path, damaged))
        try:
            self._model = tf.saved_model.load(str(path))
        except (tf.errors.OpError, OSError, ValueError, IndexError, KeyError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise ServerError(
                f"{path} does not load ({type(e).__name__}: {first}): the SavedModel is damaged "
                f"or not one; with a models folder, `--version N` picks another version"
            ) from None

    def _run(self, signature: str, **inputs: Any) -> Prediction:
        if signature not in self._model.signatures:
            raise ServerError(
                f"{self.path} has no {signature} signature (it was exported "
                f"before that signature existed): export it again"
                + (
                    ", or send 28x28 images with --signature serving_default"
                    if signature == "predict_image"
                    else ""
                )
            )
        try:
            out = self._model.signatures[signature](**inputs)
        except self._tf.errors.InvalidArgumentError as e:
            reason = assertion_text(e.message)
            raise Refusal(
                f"{self.path}: {signature} refused the request: {reason}", reason
            ) from None
        return Prediction.from_outputs({k: v.numpy() for k, v in out.items()})

    def predict(self, images: np.ndarray) -> Prediction:
        return self._run("serving_default", images=self._tf.constant(images, self._tf.uint8))

    def predict_encoded(self, blobs: list[bytes]) -> Prediction:
        return self._run("predict_png", image_bytes=self._tf.constant(blobs))

    def predict_photos(self, blobs: list[bytes]) -> Prediction:
        return self._run("predict_image", image_bytes=self._tf.constant(blobs))


@dataclasses.dataclass(eq=False, repr=False)
class _ServerClient:
    """What both TF Serving clients are given: the server, the model, which version (or, in
    the subclasses, a version label) and how long to wait."""

    server: str
    model: str = MODEL_NAME
    version: int | None = None
    timeout: float = 10.0


@dataclasses.dataclass(eq=False, repr=False)
class RestClient(_ServerClient):
    """TF Serving's REST API (port 8501): predict, model status, model metadata."""

    form: str = "row"
    label: str | None = None

    def __post_init__(self) -> None:
        if self.form not in ("row", "columnar"):
            raise ValueError("form must be 'row' or 'columnar'")
        self.base = self.server if self.server.startswith("http") else f"http://{self.server}"

    def _model_url(self) -> str:
        url = f"{self.base}/v1/models/{self.model}"
        if self.label is not None:  # a version label (`python -m pipeline models promote`)
            return f"{url}/labels/{self.label}"
        return f"{url}/versions/{self.version}" if self.version is not None else url

    def _call(self, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            url,
            data=data,
            method="POST" if data else "GET",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            detail = _error_text(e.read()) or e.reason
            if e.code == 400:  # TF Serving's answer to an InvalidArgument in the graph
                raise Refusal(f"{url}: HTTP 400: {detail}", assertion_text(str(detail))) from None
            raise ServerError(f"{url}: HTTP {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise ServerError(f"{url}: timed out after {self.timeout:g} s") from None
            if isinstance(reason, ConnectionRefusedError):
                raise ServerError(
                    f"{url}: connection refused (is TF Serving running? `make serve`)"
                ) from None
            raise ServerError(f"{url}: cannot connect ({reason})") from None
        except TimeoutError:  # socket.timeout is TimeoutError
            raise ServerError(f"{url}: timed out after {self.timeout:g} s") from None
        try:
            value = json.loads(payload)
        except ValueError:
            raise ServerError(f"{url}: answer is not JSON: {payload[:200]!r}") from None
        if isinstance(value, dict) and "error" in value:
            raise ServerError(f"{url}: server error: {value['error']}")
        return value

    def _predict(self, signature: str, input_name: str, values: list[Any]) -> Prediction:
        body: dict[str, Any]
        if self.form == "row":
            body = {"signature_name": signature, "instances": values}
        else:
            body = {"signature_name": signature, "inputs": {input_name: values}}
        answer = self._call(f"{self._model_url()}:predict", body)
        try:
            outputs: dict[str, Any]
            if "predictions" in answer:
                rows = answer["predictions"]
                outputs = {k: [r[k] for r in rows] for k in (rows[0] if rows else {})}
                outputs.setdefault("probabilities", np.zeros((0, 10)))
                outputs.setdefault("class_ids", [])
            else:
                outputs = answer["outputs"]
            return Prediction.from_outputs(outputs)
        except (KeyError, TypeError, IndexError) as e:
            raise ServerError(
                f"unexpected answer from the server (missing {e}): {str(answer)[:200]}"
            ) from None

    def predict(self, images: np.ndarray) -> Prediction:
        return self._predict("serving_default", "images", np.asarray(images).tolist())

    def predict_encoded(self, blobs: list[bytes]) -> Prediction:
        # Binary values travel as {"b64": ...}, as TF Serving's REST API documents.
        return self._predict(
            "predict_png", "image_bytes", [{"b64": base64.b64encode(b).decode()} for b in blobs]
        )

    def predict_photos(self, blobs: list[bytes]) -> Prediction:
        return self._predict(
            "predict_image", "image_bytes", [{"b64": base64.b64encode(b).decode()} for b in blobs]
        )

    def status(self) -> dict[str, Any]:
        return self._call(self._model_url())

    def metadata(self) -> dict[str, Any]:
        return self._call(f"{self._model_url()}/metadata")


@dataclasses.dataclass(eq=False, repr=False)
class GrpcClient(_ServerClient):
    """TF Serving's gRPC API (port 8500), through tensorflow-serving-api."""

    label: str | None = None

    def __post_init__(self) -> None:
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self._grpc = grpc
        self._channel = grpc.insecure_channel(self.server)
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def _predict(self, signature: str, input_name: str, tensor: Any) -> Prediction:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model
        request.model_spec.signature_name = signature
        if self.label is not None:
            request.model_spec.version_label = self.label
        elif self.version is not None:
            request.model_spec.version.value = self.version
        request.inputs[input_name].CopyFrom(tensor)
        try:
            response = self._stub.Predict(request, timeout=self.timeout)
        except self._grpc.RpcError as e:
            message = f"{self.server}: gRPC {e.code().name}: {e.details()}"
            if e.code() == self._grpc.StatusCode.INVALID_ARGUMENT:
                raise Refusal(message, assertion_text(str(e.details()))) from None
            raise ServerError(message) from None
        try:
            return Prediction.from_outputs(
                {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
            )
        except KeyError as e:
            raise ServerError(f"{self.server}: answer lacks output {e}") from None

    def predict(self, images: np.ndarray) -> Prediction:
        import tensorflow as tf

        return self._predict(
            "serving_default", "images", tf.make_tensor_proto(np.asarray(images, np.uint8))
        )

    def predict_encoded(self, blobs: list[bytes]) -> Prediction:
        import tensorflow as tf

        return self._predict(
            "predict_png",
            "image_bytes",
            tf.make_tensor_proto(blobs, dtype=tf.string, shape=[len(blobs)]),
        )

    def predict_photos(self, blobs: list[bytes]) -> Prediction:
        import tensorflow as tf

        return self._predict(
            "predict_image",
            "image_bytes",
            tf.make_tensor_proto(blobs, dtype=tf.string, shape=[len(blobs)]),
        )


def assertion_text(message: str) -> str:
    """The readable part of a TensorFlow InvalidArgument: a failed tf.debugging.Assert's
    message, or an op's own (a decoder's "Invalid PNG data"), without the Python stack that
    TensorFlow puts before it ("Detected at node ... defined at ...") or the node after it."""
    text = message.split("\n\t [[", 1)[0].split(" [Op:", 1)[0]
    if "assertion failed:" in text:
        text = text.split("assertion failed:", 1)[-1]
        return _named_figures(" ".join(text.replace("] [", " ").strip(" []").split()))
    lines = [line for line in text.splitlines() if line.strip()]  # the op's message is last
    return " ".join((lines[-1] if lines else text).split())


def _named_figures(text: str) -> str:
    """An assertion's "... (a, b, c): 0.1 2 3" as "... (a 0.1, b 2, c 3)": each figure after its
    name, as the graph printed it (never rounded: a value just under a floor must not read as the
    floor); any other text as it is."""
    head, colon, tail = text.rpartition("):")
    names, values = head.rpartition("(")[2].split(", "), tail.split()
    if not colon or "(" not in head or len(names) != len(values):
        return text
    try:
        [float(v) for v in values]
    except ValueError:
        return text
    pairs = ", ".join(f"{n} {v}" for n, v in zip(names, values, strict=True))
    return f"{head.rpartition('(')[0]}({pairs})"


def _error_text(body: bytes) -> str:
    try:
        value = json.loads(body)
        return str(value.get("error", value)) if isinstance(value, dict) else str(value)
    except ValueError:
        return body.decode(errors="replace")[:300]
