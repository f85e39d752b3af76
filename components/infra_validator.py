"""Infra validation: load a staged SavedModel the way TF Serving does, in a separate process
that imports nothing of the trainer and no Keras model: TensorFlow's graph-level SavedModel loader
(the `serve` tag, a Session, the signatures' tensor names, as TF Serving's C++ server runs them).

It replays every warmup record, runs the examples through `serving_default` and a sample through
every other signature, and does the same for the baseline version (so the gate compares both
models on the same examples, in the same process). The process is started early, so that its
TensorFlow import overlaps training, and then serves requests, one JSON line each, on stdin:

    {"candidate": DIR, "baseline": DIR or null, "examples": NPZ, "out": DIR, "sample": N}

and answers one JSON line on stdout: {"ok": bool, "reason": str, "seconds": float}, after a
{"progress": "probabilities"} line as soon as candidate_probabilities.npy is written (the
pipeline draws the report's figures from it while the validation goes on). A request
{"score_baseline": DIR, "examples": NPZ}, sent while the trainer trains, gets no answer: the
baseline is scored then, and a later validation of the same baseline and examples (unchanged
on disk) uses those scores instead of loading it again.
Outputs in `out`: candidate_probabilities.npy, baseline_probabilities.npy (with a baseline),
signature_outputs.npz (the sample's probabilities through every other signature that answered)
and infra_validation.json. A failed validation answers {"ok": false, "reason", "record"}: what
was checked until then and how long it took.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from components import files

log = logging.getLogger(__name__)

WARMUP_PATH = Path("assets.extra") / "tf_serving_warmup_requests"
BATCH = 1024


class InfraValidationError(RuntimeError):
    """The staged model does not load, warm up or serve as expected; nothing is published.
    `record`: what was checked before the failure, and how long it took (for metrics.json)."""

    def __init__(self, message: str, record: dict[str, Any] | None = None):
        super().__init__(message)
        self.record = record


class BaselineDamaged(InfraValidationError):
    """The latest published version (the gate's baseline) does not load or serve: the new
    model was not judged, and is not at fault."""


# --------------------------------------------------------------------------------------------
# The validating process


class _Served:
    """A SavedModel loaded into its own graph and Session, as TF Serving's SessionBundle."""

    def __init__(self, export_dir: Path):
        import tensorflow as tf

        self.tf = tf
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        with self.graph.as_default():
            meta = tf.compat.v1.saved_model.loader.load(self.session, ["serve"], str(export_dir))
        # (TF2 SavedModels also carry "__saved_model_init_op", which is not a serving signature)
        self.signatures = {k: v for k, v in meta.signature_def.items() if not k.startswith("__")}
        # The calibrated threshold the `uncertain` output must follow (None: no readable record)
        self.threshold: float | None = None
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            extra = Path(export_dir) / "assets.extra" / "uncertainty.json"
            self.threshold = float(json.loads(extra.read_text())["threshold"])

    def run(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sig = self.signatures[signature]
        feed = {sig.inputs[k].name: v for k, v in inputs.items()}
        fetch = {k: t.name for k, t in sig.outputs.items()}
        return self.session.run(fetch, feed_dict=feed)

    def close(self) -> None:
        self.session.close()


class _WarmupFailure(InfraValidationError):
    def __init__(self, number: int, message: str):
        super().__init__(message)
        self.number = number


def _warmup_requests(export_dir: Path) -> list[tuple[int, str, dict[str, np.ndarray]]]:
    """The warmup records as (number, signature, inputs), in the file's order."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = export_dir / WARMUP_PATH
    if not path.is_file():
        raise InfraValidationError(f"no warmup records at {path}")
    requests = []
    try:
        for number, raw in enumerate(tf.data.TFRecordDataset(str(path)).as_numpy_iterator(), 1):
            request = prediction_log_pb2.PredictionLog.FromString(raw).predict_log.request
            name = request.model_spec.signature_name or "serving_default"
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            requests.append((number, name, inputs))
    except Exception as e:
        raise InfraValidationError(
            f"the warmup records at {path} cannot be read: {type(e).__name__}: {_first_line(e)}"
        ) from None
    if not requests:
        raise InfraValidationError(f"{path} holds no warmup records")
    return requests


def _replay(served: _Served, requests: list[tuple[int, str, dict[str, np.ndarray]]]) -> int:
    for number, name, inputs in requests:
        try:
            served.run(name, inputs)
        except Exception as e:
            raise _WarmupFailure(
                number,
                f"warmup record {number} ({name}) fails: {type(e).__name__}: {_first_line(e)}",
            ) from None
    return len(requests)


def _replay_warmup(
    served: _Served, export_dir: Path, pool: concurrent.futures.Executor
) -> Callable[[], int]:
    """Replay every warmup record, as TF Serving does on load, on `pool`; returns a function
    that waits and gives the number replayed, or raises for the first record (in file order)
    that failed.

    The first request to a signature sets up its graph in the Session; predict_image's is big
    (~1.2 s on one core, mostly Grappler), so its records go first."""
    requests = _warmup_requests(export_dir)
    photos = [r for r in requests if r[1] == "predict_image"]
    others = [r for r in requests if r[1] != "predict_image"]
    futures = [pool.submit(_replay, served, group) for group in (photos, others) if group]

    def result() -> int:
        failures = []
        for future in futures:
            try:
                future.result()
            except _WarmupFailure as e:
                failures.append(e)
        if failures:
            raise min(failures, key=lambda e: e.number)
        return len(requests)

    return result


def _probabilities(served: _Served, images: np.ndarray, judge_flags: bool = True) -> np.ndarray:
    """serving_default's probabilities of `images`, its other outputs checked against them.
    `judge_flags` False: the baseline's, whose `uncertain` flags the gate does not use (a
    version published by hand, without its assets.extra, is still compared with)."""
    out = []
    for i in range(0, len(images), BATCH):
        result = served.run("serving_default", {"images": images[i : i + BATCH]})
        probs = np.asarray(result["probabilities"], np.float32)
        if probs.shape != (len(images[i : i + BATCH]), 10) or not np.isfinite(probs).all():
            raise InfraValidationError(
                f"serving_default returned probabilities of shape "
                f"{probs.shape} (finite: {np.isfinite(probs).all()})"
            )
        ids = np.asarray(result["class_ids"])
        if not np.array_equal(ids, probs.argmax(1)):
            raise InfraValidationError(
                "serving_default's class_ids disagree with its probabilities"
            )
        if "uncertain" in result and judge_flags:
            _check_flags(served, probs, np.asarray(result["uncertain"]))
        out.append(probs)
    return np.concatenate(out)


def _check_flags(served: _Served, probs: np.ndarray, flags: np.ndarray) -> None:
    if served.threshold is None:
        raise InfraValidationError(
            "assets.extra/uncertainty.json (the calibrated threshold) is missing or unreadable: "
            "the `uncertain` output cannot be checked"
        )
    if not np.array_equal(flags, probs.max(1) < served.threshold):
        raise InfraValidationError(
            "serving_default's uncertain flags disagree with its probabilities and the "
            "calibrated threshold"
        )


def _encode_pngs(images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    return np.array([tf.io.encode_png(img[..., None]).numpy() for img in images], dtype=object)


def _check_signatures(
    served: _Served, pngs: np.ndarray, expected: np.ndarray, out: Path
) -> dict[str, Any]:
    """The sample (PNG-encoded) through every signature besides serving_default; `expected`:
    its probabilities from serving_default. Their probabilities go to `out`/SIGNATURE_OUTPUTS
    (the trainer compares predict_image's with its model on the same normalised images)."""
    checks: dict[str, Any] = {}
    outputs: dict[str, np.ndarray] = {}
    for name in sorted(served.signatures):
        if name == "serving_default":
            continue
        key = next(iter(served.signatures[name].inputs))
        try:
            result = served.run(name, {key: pngs})
        except Exception as e:
            if name == "predict_png":
                raise
            # predict_image takes photos (its warmup records, replayed above, are photos): a
            # 28x28 test digit it refuses (e.g. too faint to find the ink) is noted, not fatal.
            checks[name] = {"examples": len(pngs), "refused": _refusal_text(e)}
            continue
        probs = np.asarray(result["probabilities"], np.float32)
        if probs.shape != expected.shape or not np.allclose(probs.sum(1), 1.0, atol=1e-4):
            raise InfraValidationError(f"{name} returned probabilities of shape {probs.shape}")
        outputs[name] = probs
        agree = float((probs.argmax(1) == expected.argmax(1)).mean())
        if name == "predict_png":
            diff = float(np.abs(probs - expected).max())
            if diff > 1e-5:
                raise InfraValidationError(
                    f"predict_png disagrees with serving_default on "
                    f"the same pixels (max difference {diff:.2e})"
                )
            checks[name] = {"examples": len(pngs), "max_abs_difference": diff}
        else:  # predict_image renormalises (crop, 20x20, centre): same answer, not same numbers
            checks[name] = {"examples": len(pngs), "class_agreement": agree}
    _save_npz(out / SIGNATURE_OUTPUTS, outputs)
    return checks


SIGNATURE_OUTPUTS = "signature_outputs.npz"


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    files.save_npz(path, **arrays)


MODEL_SERVER = "tensorflow_model_server"
# The TF Serving release of tensorflow-serving-api in pyproject.toml: serving/serve.sh's default
# image, which `make serve` runs (tests/test_deploy.py checks that the two agree).
TF_SERVING_IMAGE = "tensorflow/serving:2.21.0"
MODEL_SERVER_TIMEOUT_S = float(os.environ.get("MNIST_MODEL_SERVER_TIMEOUT_S", "120"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass(frozen=True)
class ModelServer:
    """How TF Serving is started here: the `tensorflow_model_server` binary, or its pinned
    Docker image (what `make serve` runs too) when a Docker engine answers and has the image."""

    binary: str | None = None
    docker: str | None = None

    @property
    def label(self) -> str:
        return self.binary or f"docker run {TF_SERVING_IMAGE}"

    def argv(self, models: Path, grpc_port: int, rest_port: int, name: str) -> list[str]:
        if self.binary:
            return [
                self.binary,
                f"--port={grpc_port}",
                f"--rest_api_port={rest_port}",
                "--model_name=mnist",
                f"--model_base_path={models}",
            ]
        assert self.docker is not None
        return [
            self.docker, "run", "--rm", "--name", name, "--label", "mnist-infra-validation",
            "-p", f"127.0.0.1:{grpc_port}:8500", "-p", f"127.0.0.1:{rest_port}:8501",
            "-v", f"{models}:/models/mnist:ro", "-e", "MODEL_NAME=mnist", TF_SERVING_IMAGE,
        ]  # fmt: skip

    def stop(self, name: str) -> None:
        """A container outlives its `docker run` client: remove it by name."""
        if self.docker:
            try:
                subprocess.run(
                    [self.docker, "rm", "-f", name], capture_output=True, timeout=60, check=False
                )
            except (OSError, subprocess.SubprocessError) as e:
                log.warning("could not remove the container %s: %s", name, e)


# Docker is opt-in: how a container sees a bind-mounted folder depends on the engine's set-up
# (docker-in-docker, rootless, SELinux labels), which a run cannot check before it has waited for
# a model that never becomes AVAILABLE; a good model must not fail for that.
DOCKER_OPT_IN = "MNIST_INFRA_DOCKER"


def find_model_server() -> tuple[ModelServer | None, str]:
    """(how to start TF Serving, or None; what the record says when it is not used)."""
    import shutil

    binary = shutil.which(MODEL_SERVER)
    if binary:
        return ModelServer(binary=binary), ""
    docker = shutil.which("docker")
    only = "validated with TensorFlow's graph-level loader only"
    if docker is not None and os.environ.get(DOCKER_OPT_IN) != "1":
        return None, (
            f"{MODEL_SERVER} not on PATH ({DOCKER_OPT_IN}=1 validates in {TF_SERVING_IMAGE} "
            f"with Docker): {only}"
        )
    if docker is None or not _succeeds([docker, "info"]):
        return None, f"{MODEL_SERVER} not on PATH and no Docker engine answers: {only}"
    if not _succeeds([docker, "image", "inspect", TF_SERVING_IMAGE]):
        return None, (
            f"{MODEL_SERVER} not on PATH; Docker answers but {TF_SERVING_IMAGE} is not pulled "
            f"(docker pull {TF_SERVING_IMAGE} to use it): {only}"
        )
    return ModelServer(docker=docker), ""


def _succeeds(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def validate_with_model_server(
    server_kind: ModelServer, candidate: Path, images: np.ndarray, expected: np.ndarray
) -> dict[str, Any]:
    """The real server, when it is here: start it on a copy of the staged model, wait for
    AVAILABLE, send a REST and a gRPC request, compare with the graph loader's answers, stop."""
    import shutil
    import tempfile

    started = time.perf_counter()
    label = server_kind.label
    with tempfile.TemporaryDirectory(prefix="infra-") as tmp:
        os.chmod(tmp, 0o755)  # readable by a container's user (mkdtemp makes it 0700)
        shutil.copytree(candidate, Path(tmp) / "mnist" / "1")
        grpc_port, rest_port = _free_port(), _free_port()
        name = f"mnist-infra-{os.getpid()}-{rest_port}"
        log_path = Path(tmp) / "server.log"
        with open(log_path, "w") as log_file:
            # Its own process group: stopped with everything it started, even when the
            # validating process is killed.
            server = subprocess.Popen(
                server_kind.argv(Path(tmp) / "mnist", grpc_port, rest_port, name),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        rest = f"http://127.0.0.1:{rest_port}/v1/models/mnist"

        def server_log() -> str:
            lines = log_path.read_text(errors="replace").strip().splitlines()
            return lines[-1][:300] if lines else "(no output)"

        try:
            _wait_until_available(label, server, rest, server_log)
            sample, want = images[:8], expected[:8]
            rest_probs = _rest_predict(rest, sample)
            grpc_probs = _grpc_predict(grpc_port, sample)
            for kind, got in (("REST", rest_probs), ("gRPC", grpc_probs)):
                if got.shape != want.shape or float(np.abs(got - want).max()) > 1e-5:
                    raise InfraValidationError(
                        f"{label} answers differently over {kind} than the graph loader"
                    )
        finally:
            _stop_group(server)
            server_kind.stop(name)
    return {
        "server": label,
        "requests": ["REST", "gRPC"],
        "examples": 8,
        "seconds": round(time.perf_counter() - started, 3),
    }


def stop_cleanly_on_sigterm() -> None:
    """SIGTERM (the trainer stopping a validation past its timeout) unwinds through the
    `finally` blocks, which stop a model server: a Docker container outlives its killed
    `docker run` client and is removed there by name. (A process stuck inside a TensorFlow
    call runs no Python handler: it is killed 10 s later, and a container it started stays.)"""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def die_with_parent() -> None:
    """In a child just forked (Popen's preexec_fn): the kernel kills it when its parent dies, so
    a trainer killed with SIGKILL leaves no validating process (or model server) holding ~700 MB
    behind it. Linux only; elsewhere the child still ends when its stdin closes."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# The validating process's CPU priority below the trainer's (`nice`). Started beside training,
# it imports TensorFlow and scores the baseline while the trainer trains; on a machine with few
# cores, at equal priority it took CPU from the train steps (a 5-epoch fit 3.78 -> 3.19 s, the
# whole run 9.69 -> 8.79 s, `python -m benchmarks.ab` medians of 5 pairs): lower, it works in
# the trainer's idle moments and still finishes ahead. During the validation the trainer waits.
VALIDATOR_NICENESS = 10


def _validator_child() -> None:
    """Popen's preexec_fn for the validating process (and the model server it starts)."""
    die_with_parent()
    os.nice(VALIDATOR_NICENESS)


def _stop_group(proc: subprocess.Popen) -> None:
    import signal

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except (ProcessLookupError, PermissionError):
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_until_available(
    binary: str, server: subprocess.Popen, rest: str, server_log: Any
) -> None:
    import urllib.request

    deadline = time.monotonic() + MODEL_SERVER_TIMEOUT_S
    while True:
        if server.poll() is not None:
            raise InfraValidationError(
                f"{binary} exited with code {server.returncode} before serving: {server_log()}"
            )
        try:
            with urllib.request.urlopen(rest, timeout=2) as r:
                states = [
                    v.get("state") for v in json.loads(r.read()).get("model_version_status", [])
                ]
            if "AVAILABLE" in states:
                return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise InfraValidationError(
                f"{binary} did not report the model AVAILABLE within "
                f"{MODEL_SERVER_TIMEOUT_S:g} s: {server_log()}"
            )
        time.sleep(0.5)


def _rest_predict(model_url: str, images: np.ndarray) -> np.ndarray:
    """The server's probabilities for `images`, over REST."""
    import urllib.request

    body = json.dumps({"signature_name": "serving_default", "instances": images.tolist()}).encode()
    with urllib.request.urlopen(
        urllib.request.Request(f"{model_url}:predict", data=body, method="POST"), timeout=30
    ) as r:
        return np.array(
            [p["probabilities"] for p in json.loads(r.read())["predictions"]], np.float32
        )


def _grpc_predict(port: int, images: np.ndarray) -> np.ndarray:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.model_spec.signature_name = "serving_default"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout=30)
    return tf.make_ndarray(response.outputs["probabilities"]).astype(np.float32)


def validate(
    request: dict[str, Any], notify: Callable[[dict[str, Any]], None] = lambda _: None
) -> dict[str, Any]:
    """One validation; writes its outputs in request["out"]; raises InfraValidationError.
    `notify({"progress": "probabilities"})` as soon as the served probabilities of the examples
    are written (the caller may start on them; the validation is not over)."""
    started = time.perf_counter()
    candidate, out = Path(request["candidate"]), Path(request["out"])
    out.mkdir(parents=True, exist_ok=True)
    with np.load(request["examples"]) as data:
        images = data["images"]
    record: dict[str, Any] = {
        "loader": "tf.compat.v1.saved_model.loader (TF Serving's graph "
        "path: serve tag, Session, signature tensor names)",
        "candidate": str(candidate),
        "examples": int(len(images)),
    }
    try:
        return _validate(request, notify, record, candidate, out, images, started)
    except InfraValidationError as e:
        if not isinstance(e, BaselineDamaged):
            e.record = dict(record, seconds=round(time.perf_counter() - started, 3))
        raise


def _validate(
    request: dict[str, Any],
    notify: Callable[[dict[str, Any]], None],
    record: dict[str, Any],
    candidate: Path,
    out: Path,
    images: np.ndarray,
    started: float,
) -> dict[str, Any]:
    """`validate`'s checks, filling `record` (and its "passed_checks" list) as they pass;
    `started`: when the validation began (perf_counter), for its seconds."""
    passed: list[str] = record.setdefault("passed_checks", [])
    try:
        served = _Served(candidate)
    except Exception as e:
        raise InfraValidationError(
            f"the staged model does not load: {type(e).__name__}: {_first_line(e)}"
        ) from None
    passed.append("load (serve tag, Session)")
    try:
        record["signatures"] = sorted(served.signatures)
        if "serving_default" not in served.signatures:
            raise InfraValidationError("the staged model has no serving_default signature")
        # The whole test split first (the caller starts on its probabilities), then the
        # warmup replays on a thread (_replay_warmup) while the baseline goes through here.
        # (Not the other way round: while a Session sets up one signature's graph, a first
        # request to another waits, and predict_image's takes a second.)
        probs = _serving(lambda: _probabilities(served, images))
        _save(out / "candidate_probabilities.npy", probs)
        passed.append(f"serving_default on all {len(images)} examples")
        notify({"progress": "probabilities"})
        sample = images[: int(request.get("sample", 64))]
        pngs, baseline_probs = _warmup_and_baseline(served, request, record, sample, images)
        passed.append("warmup replay")
        record["other_signatures"] = _serving(
            lambda: _check_signatures(served, pngs, probs[: len(sample)], out)
        )
        passed.append(f"the other signatures on {len(sample)} examples")
    finally:
        served.close()
    server, note = find_model_server()
    if server is not None:
        record["model_server"] = validate_with_model_server(server, candidate, images, probs)
        passed.append(server.label)
    else:
        record["model_server"] = note
    if baseline_probs is not None:
        _save(out / "baseline_probabilities.npy", baseline_probs)
        record["baseline"] = request["baseline"]
    record["seconds"] = round(time.perf_counter() - started, 3)
    files.write_text(out / "infra_validation.json", json.dumps(record, indent=2) + "\n")
    return record


def _warmup_and_baseline(
    served: _Served,
    request: dict[str, Any],
    record: dict[str, Any],
    sample: np.ndarray,
    images: np.ndarray,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The warmup replayed on a thread while the sample is PNG-encoded and the baseline scored
    here (or its scores from ahead taken): (the sample's PNGs, the baseline's probabilities)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        warmup = _replay_warmup(served, Path(request["candidate"]), pool)
        try:
            pngs = _serving(lambda: _encode_pngs(sample))
            baseline_probs = _scored_ahead(request.get("baseline"), request["examples"], images)
            if request.get("baseline"):
                record["baseline_scored_ahead"] = baseline_probs is not None
            if baseline_probs is None:
                baseline_probs = _baseline_probabilities(request.get("baseline"), images)
        finally:
            record["warmup_records_replayed"] = warmup()  # a warmup failure first
    return pngs, baseline_probs


def _save(path: Path, array: np.ndarray) -> None:
    with files.atomic_write(path) as f:  # np.save(str) would add ".npy" to the temporary name
        np.save(f, array)


def _serving(call: Callable[[], Any]) -> Any:
    """`call()`, with any failure of the served model as an InfraValidationError."""
    try:
        return call()
    except InfraValidationError:
        raise
    except Exception as e:
        raise InfraValidationError(f"serving fails: {type(e).__name__}: {_first_line(e)}") from None


# Baseline probabilities scored ahead (a "score_baseline" request, sent while the trainer
# trains): {key: probabilities}, key = the baseline's and the examples' identity on disk.
_scored: dict[tuple[Any, ...], np.ndarray] = {}


def _identity(baseline: str, examples: str) -> tuple[Any, ...]:
    """What the scores depend on: every file of the baseline's folder, and the examples file.
    A published version is never rewritten in place, but a folder of that name could be
    deleted and made again (new inodes, new change times)."""
    files = [*sorted(p for p in Path(baseline).rglob("*") if p.is_file()), Path(examples)]
    stats = [(str(f), f.stat()) for f in files]
    return tuple((f, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for f, s in stats)


def score_baseline(request: dict[str, Any]) -> None:
    """Score the baseline on the examples now and keep the result for a later `validate` of
    the same baseline and examples (the baseline is known, and the test examples written,
    before training; scoring it then uses a core the trainer leaves idle). Any failure is left
    for `validate` to meet and report."""
    try:
        baseline, examples = str(request["score_baseline"]), str(request["examples"])
        key = _identity(baseline, examples)  # before reading: what is read is at least as new
        with np.load(examples) as data:
            images = data["images"]
        probs = _baseline_probabilities(baseline, images)
        if probs is not None and _identity(baseline, examples) == key:
            _scored[key] = probs
    except Exception:
        pass


def _scored_ahead(baseline: str | None, examples: str, images: np.ndarray) -> np.ndarray | None:
    """The baseline's probabilities from a `score_baseline` of the same files, if any."""
    try:
        ahead = _scored.pop(_identity(baseline, examples), None) if baseline else None
    except OSError:
        return None
    return ahead if ahead is not None and len(ahead) == len(images) else None


def _baseline_probabilities(baseline: str | None, images: np.ndarray) -> np.ndarray | None:
    if not baseline:
        return None
    try:
        served = _Served(Path(baseline))
        try:
            return _probabilities(served, images, judge_flags=False)
        finally:
            served.close()
    except Exception as e:
        raise BaselineDamaged(
            f"the baseline (the latest published version, {baseline}) does not load or serve: "
            f"{type(e).__name__}: {_first_line(e)}; that version is damaged, not the new model: "
            f"delete that folder and run again"
        ) from None


def _refusal_text(e: BaseException) -> str:
    """The failed assertion's own line of a graph error (its first line is only "Graph
    execution error:")."""
    text = getattr(e, "message", None) or str(e)
    found = [line.strip() for line in text.splitlines() if "assertion failed" in line]
    return found[0][:300] if found else _first_line(e)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def serve_requests() -> None:
    """The validating process's loop: one JSON request per stdin line, one answer per line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    stop_cleanly_on_sigterm()
    from components.tf_import import import_tensorflow

    import_tensorflow()  # the slow part: done before any request

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        started = time.perf_counter()
        try:
            request = json.loads(line)
            if "score_baseline" in request:  # a head start: no answer expected
                score_baseline(request)
                continue
            record = validate(request, lambda message: print(json.dumps(message), flush=True))
            answer = {"ok": True, "reason": "served as expected", "record": record}
        except InfraValidationError as e:
            answer = {
                "ok": False,
                "reason": str(e),
                "record": e.record,
                "baseline_damaged": isinstance(e, BaselineDamaged),
            }
        except OSError as e:  # writing its files (a full disk): the trainer raises it again
            answer = {
                "ok": False,
                "reason": f"{type(e).__name__}: {_first_line(e)}",
                "errno": e.errno,
                "strerror": e.strerror,
                "filename": e.filename,
            }
        except Exception as e:  # a bug or an unexpected file: reported, never a hang
            answer = {"ok": False, "reason": f"{type(e).__name__}: {_first_line(e)}"}
        answer["seconds"] = round(time.perf_counter() - started, 3)
        print(json.dumps(answer), flush=True)


# --------------------------------------------------------------------------------------------
# The client side (the pipeline)


class Validator:
    """A handle on the validating process: start it early, ask it later."""

    def __init__(self, timeout_s: float = 600.0):
        self.timeout_s = timeout_s
        self.restarted = False
        self._start()

    def _start(self) -> None:
        from components.compile_cache import without_flag

        # Not the trainer's XLA cache folder: the trainer keeps what is written there.
        env = {
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "TF_XLA_FLAGS": " ".join(without_flag(os.environ)),
        }
        # No GPU for it: on a GPU machine the trainer holds the device memory, and TF Serving
        # answers the same on the CPU (the comparison's tolerance is the CPU's).
        env["CUDA_VISIBLE_DEVICES"] = ""
        # Its own session, stopped as a group by close() and at the timeout; a model server it
        # starts has a session of its own and dies with it (PDEATHSIG), and a Docker container
        # is removed by the validating process on SIGTERM (stop_cleanly_on_sigterm).
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "components.infra_validator"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=str(Path(__file__).resolve().parents[1]),
            start_new_session=True,
            preexec_fn=_validator_child,
        )

    def _read_line(self, deadline: float | None = None) -> dict[str, Any]:
        import select

        assert self.proc.stdout is not None
        wait = self.timeout_s if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([self.proc.stdout], [], [], wait)
        if not ready:  # hung (not merely slow after this long): stopped, with any server
            _stop_group(self.proc)
            self.close()
            raise InfraValidationError(f"infra validation timed out after {self.timeout_s:g} s")
        line = self.proc.stdout.readline()
        if not line:
            raise InfraValidationError(
                f"the validating process ended (exit {self.proc.wait()}) without an answer"
            )
        try:
            answer = json.loads(line)
        except ValueError:  # a library printed to stdout: not an answer
            return self._read_line(deadline)
        return answer if isinstance(answer, dict) else self._read_line(deadline)

    def score_baseline(self, baseline: Path | None, examples: Path) -> None:
        """Let the validating process score `baseline` on `examples` now (e.g. while the
        trainer trains), for a later `validate` with the same two; no answer, no failure: a
        later `validate` scores it again if this did not work."""
        if baseline is None or self.proc.poll() is not None:
            return
        assert self.proc.stdin is not None
        request = {
            "score_baseline": str(Path(baseline).resolve()),
            "examples": str(Path(examples).resolve()),
        }
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass

    def validate(
        self,
        candidate: Path,
        examples: Path,
        out: Path,
        baseline: Path | None = None,
        sample: int = 64,
        on_probabilities: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """`on_probabilities()` is called once the served probabilities are in `out` (the
        validation goes on; they count only if it passes)."""
        if self.proc.poll() is not None and not self.restarted:
            # Gone while the trainer trained (e.g. killed for memory): the model is not at
            # fault; a fresh process (a TensorFlow import, no scores ahead) validates it.
            log.warning(
                "the validating process ended (exit %s) before the validation: starting another",
                self.proc.returncode,
            )
            self.close()
            self.restarted = True
            self._start()
        assert self.proc.stdin is not None
        if self.proc.poll() is not None:
            raise InfraValidationError(
                f"the validating process ended early (exit {self.proc.returncode})"
            )
        # Absolute: the validating process runs in the repository's folder, not the caller's.
        request = {
            "candidate": str(Path(candidate).resolve()),
            "baseline": str(Path(baseline).resolve()) if baseline else None,
            "examples": str(Path(examples).resolve()),
            "out": str(Path(out).resolve()),
            "sample": sample,
        }
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except OSError as e:
            raise InfraValidationError(f"the validating process is gone ({e})") from None
        deadline = time.monotonic() + self.timeout_s  # for the whole answer
        try:
            return self._answer(deadline, on_probabilities)
        except InfraValidationError as e:  # a timeout, the process gone: how long it took
            if e.record is None and not isinstance(e, BaselineDamaged):
                e.record = {"seconds": round(self.timeout_s - (deadline - time.monotonic()), 3)}
            raise

    def _answer(
        self, deadline: float, on_probabilities: Callable[[], None] | None
    ) -> dict[str, Any]:
        answer = self._read_line(deadline)
        while "ready" in answer or "progress" in answer:
            if answer.get("progress") == "probabilities" and on_probabilities is not None:
                try:
                    on_probabilities()
                except Exception as e:  # a head start for the caller, never a failure here
                    log.warning("could not start on the served probabilities early: %s", e)
            answer = self._read_line(deadline)
        if not answer["ok"]:
            if answer.get("baseline_damaged"):
                raise BaselineDamaged(answer["reason"])
            if answer.get("errno") == errno.ENOSPC:  # the served model is not at fault
                raise OSError(errno.ENOSPC, answer.get("strerror"), answer.get("filename"))
            raise InfraValidationError(
                answer["reason"], dict(answer.get("record") or {}, seconds=answer["seconds"])
            )
        return dict(answer["record"], seconds=answer["seconds"])

    def close(self) -> None:
        """End of input: the validating process leaves on its own (not waited for: its
        TensorFlow teardown takes most of a second nobody needs to wait for)."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                _stop_group(self.proc)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()


if __name__ == "__main__":
    serve_requests()
