"""Strategy policy, in one place: which tf.distribute strategy a run uses, and what each strategy
allows (XLA, steps per execution, per-replica batch, mixed precision). The trainer receives the
strategy and the effective settings; nothing else decides them.

The Keras 3.15 work-arounds that the multi-device paths need live here too, each naming its
upstream issue; tests/test_strategy.py fails when the Keras internals they rely on move, or when
upstream fixes the bug (so the work-around can be removed).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    """The requested device is not available (a usage error)."""


@dataclasses.dataclass(frozen=True)
class StrategyChoice:
    """What `choose_strategy` decided, before any TensorFlow object is made."""

    kind: str  # "default" | "one_device" | "mirrored" | "multi_worker"
    device: str  # "cpu" or "gpu"
    num_devices: int  # devices this process mirrors over (GPUs, or logical CPUs)
    description: str
    # TensorFlow's intra-op and inter-op threads (0: TensorFlow's default, one per core)
    cpu_threads: int = 0
    threads_why: str = ""


@dataclasses.dataclass(frozen=True)
class Effective:
    """The settings a run actually trains with (config.json's `effective`)."""

    strategy: str
    device: str
    replicas: int
    global_batch: int
    per_replica_batch: int
    steps_per_execution: int
    jit_compile: bool
    mixed_precision: bool
    cpu_threads: int  # 0: TensorFlow's default
    why: tuple[str, ...]  # each setting that differs from the request, and why

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_tf_config(raw: str | None) -> dict[str, Any] | None:
    """TF_CONFIG as a dict when it names a cluster of more than one task, else None."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DeviceError(f"TF_CONFIG is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise DeviceError("TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    cluster = value.get("cluster") or {}
    if not isinstance(cluster, dict) or not all(
        isinstance(v, list) and all(isinstance(a, str) for a in v) for v in cluster.values()
    ):
        raise DeviceError(
            "TF_CONFIG's 'cluster' must map each job to a list of \"host:port\" addresses, "
            'e.g. {"worker": ["host1:2222", "host2:2222"]}'
        )
    tasks = sum(len(v) for v in cluster.values())
    return value if tasks > 1 else None


def choose_strategy(
    device: str, num_gpus: int, tf_config: dict[str, Any] | None = None, cpu_devices: int = 1
) -> StrategyChoice:
    """The one place that decides how training is placed and distributed.

    `device` is the user's --device (auto|cpu|gpu), `num_gpus` how many GPUs TensorFlow sees,
    `tf_config` the parsed TF_CONFIG when it names a multi-task cluster, `cpu_devices` how many
    logical devices the CPU is split into (MirroredStrategy over them when > 1).
    """
    if device == "gpu" and num_gpus == 0:
        raise DeviceError(
            "--device gpu was requested but TensorFlow sees no GPU "
            "(check the driver and CUDA install, or use --device auto|cpu)"
        )
    use_gpu = device in ("gpu", "auto") and num_gpus > 0
    used = "gpu" if use_gpu else "cpu"
    if tf_config is not None:
        return StrategyChoice(
            "multi_worker",
            used,
            num_gpus if use_gpu else 1,
            "MultiWorkerMirroredStrategy from TF_CONFIG",
        )
    if use_gpu and num_gpus > 1:
        return StrategyChoice("mirrored", "gpu", num_gpus, f"MirroredStrategy over {num_gpus} GPUs")
    if use_gpu:
        return StrategyChoice("one_device", "gpu", 1, "one GPU (/gpu:0)")
    if cpu_devices > 1:
        return StrategyChoice(
            "mirrored",
            "cpu",
            cpu_devices,
            f"MirroredStrategy over {cpu_devices} logical CPU devices",
        )
    return StrategyChoice("default", "cpu", 1, "CPU (default strategy)")


THREAD_ENV = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")
# One thread pays up to this many (examples in a replica's batch) x (hidden units): on the 2-core
# machine it won every run up to 64 x 128, and larger steps were a toss-up between runs
# (`python -m benchmarks.threads`; the README has the figures).
SMALL_STEP = 64 * 128


def with_cpu_threads(
    choice: StrategyChoice,
    requested: int,
    step_size: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> StrategyChoice:
    """Decide TensorFlow's CPU threads (`--cpu-threads`; 0 = auto) for this choice.

    `step_size` is a replica's batch times the hidden units (None: unknown, e.g. a tuning study
    whose trials differ). Auto is 1 for one replica on the CPU when the step is small
    (`SMALL_STEP`: the documented model up to batch 64): a step of the documented model is
    ~0.2 ms of work, too small to split over cores, and each op handed to another thread costs
    more than it saves (`python -m benchmarks.steps` times both). Larger steps, several replicas
    (logical CPUs, workers), GPUs, and a user who set TF_NUM_INTRAOP_THREADS or
    TF_NUM_INTEROP_THREADS keep TensorFlow's default (one thread per core).
    """
    environ = os.environ if environ is None else environ
    if requested:
        return dataclasses.replace(choice, cpu_threads=requested)
    if choice.kind != "default" or choice.device != "cpu" or step_size is None:
        return choice
    chosen_by_user = [f"{name}={environ[name]}" for name in THREAD_ENV if environ.get(name)]
    if chosen_by_user:
        return dataclasses.replace(
            choice, threads_why=f"cpu_threads auto -> TensorFlow's: {', '.join(chosen_by_user)}"
        )
    if step_size > SMALL_STEP:
        return dataclasses.replace(
            choice,
            threads_why=f"cpu_threads auto -> TensorFlow's (one per core): steps of batch x "
            f"hidden units {step_size:,} > {SMALL_STEP:,} gain from several threads",
        )
    return dataclasses.replace(
        choice,
        cpu_threads=1,
        threads_why="cpu_threads auto -> 1: one replica on the CPU, whose small steps lose more "
        "to thread hand-offs than they gain",
    )


def effective_settings(
    choice: StrategyChoice,
    replicas: int,
    *,
    batch_size: int,
    steps_per_execution: int,
    jit_compile: bool,
    mixed_precision: str,
    dropout: float,
    compute_capability: float | None = None,
) -> Effective:
    """What each strategy allows, applied to the requested settings."""
    why = []
    steps = steps_per_execution
    if steps > 1 and choice.kind in ("multi_worker", "mirrored"):
        # Keras 3.15's multi-step loop (`tf.while_loop` over `get_next_as_optional`) fails under
        # MirroredStrategy ("You must feed a value for placeholder tensor ...while/cond/
        # Placeholder") and MultiWorkerMirroredStrategy (keras-team/keras#20585).
        steps = 1
        why.append(
            f"steps_per_execution {steps_per_execution} -> 1: Keras 3.15's multi-step "
            f"loop fails under {choice.kind} strategies"
        )
    jit = jit_compile
    if jit and choice.kind not in ("default", "one_device"):
        jit = False  # cross-replica collectives are not XLA-compiled on the CPU
        why.append("jit_compile -> false: XLA stays on one device (collectives are not compiled)")
    if jit and dropout > 0:
        jit = False  # measured here: Dropout's random masks under XLA ~5x slower on the CPU
        why.append("jit_compile -> false: Dropout under XLA is ~5x slower on the CPU")
    mixed = _mixed_precision(mixed_precision, choice.device, compute_capability, why)
    if choice.threads_why:
        why.append(choice.threads_why)
    return Effective(
        strategy=choice.kind,
        device=choice.device,
        replicas=replicas,
        global_batch=batch_size,
        per_replica_batch=max(1, batch_size // replicas),
        steps_per_execution=steps,
        jit_compile=jit,
        mixed_precision=mixed,
        cpu_threads=choice.cpu_threads,
        why=tuple(why),
    )


def _mixed_precision(
    requested: str, device: str, compute_capability: float | None, why: list[str]
) -> bool:
    """Whether float16 compute is on: `requested` on/off as given; auto on GPUs of compute
    capability 7.0 or newer (appending the reason to `why`)."""
    if requested == "on":
        if device == "cpu":
            log.warning(
                "--mixed-precision on, on the CPU: float16 is emulated there and usually slower"
            )
        return True
    if requested != "auto":
        return False
    mixed = device == "gpu" and (compute_capability or 0.0) >= 7.0
    why.append(
        f"mixed_precision auto -> {'on' if mixed else 'off'}: "
        + (
            "a GPU of compute capability >= 7.0"
            if mixed
            else "float16 pays only on GPUs of compute capability >= 7.0"
        )
    )
    return mixed


def make_strategy(choice: StrategyChoice) -> Any:
    import tensorflow as tf

    if choice.kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if choice.kind == "mirrored" and choice.device == "cpu":
        return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(choice.num_devices)])
    if choice.kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    if choice.kind == "one_device":
        return tf.distribute.OneDeviceStrategy(f"/{choice.device}:0")
    return tf.distribute.get_strategy()


@dataclasses.dataclass(frozen=True)
class ClusterRole:
    """This process's place in a TF_CONFIG cluster."""

    is_chief: bool
    task: str  # "local", or e.g. "worker-1"


def cluster_role(tf_config: dict[str, Any] | None) -> ClusterRole:
    """The chief is the "chief" task, or worker 0 when the cluster names no chief (Keras's
    multi-worker convention). Only the chief writes shared artifacts."""
    if not tf_config:
        return ClusterRole(True, "local")
    task = tf_config.get("task") or {}
    task_type, index = task.get("type", "worker"), int(task.get("index", 0))
    has_chief = "chief" in (tf_config.get("cluster") or {})
    is_chief = task_type == "chief" or (not has_chief and task_type == "worker" and index == 0)
    return ClusterRole(is_chief, f"{task_type}-{index}")


def setup_device(
    device: str,
    *,
    deterministic: bool,
    seed: int,
    tf_config: dict[str, Any] | None = None,
    cpu_devices: int = 1,
    cpu_threads: int = 0,
    step_size: int | None = None,
) -> tuple[StrategyChoice, Any, float | None]:
    """Resolve --device, hide GPUs for --device cpu, split the CPU for --cpu-devices, set the
    CPU threads (--cpu-threads; `step_size` as in `with_cpu_threads`), make the strategy, set
    seeds. Returns (choice, strategy, the first GPU's compute capability).

    Call before any TF op runs: device visibility, logical devices, thread pools and
    MultiWorkerMirrored's collective ops can only be configured at program start-up.
    """
    import keras
    import tensorflow as tf

    from components import gpu_diagnostics

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus and device != "cpu":
        hint = gpu_diagnostics.explain_missing_gpu(0)
        if hint:
            log.warning("%s", hint)
    choice = with_cpu_threads(
        choose_strategy(device, len(gpus), tf_config, cpu_devices), cpu_threads, step_size
    )
    choice = _apply_threads(choice)
    if choice.device == "cpu" and gpus:
        tf.config.set_visible_devices([], "GPU")
    if choice.kind == "mirrored" and choice.device == "cpu":
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * choice.num_devices
            )
        except RuntimeError:  # already initialised in this process (tests): keep what exists
            pass
    capability = None
    if choice.device == "gpu":
        details = tf.config.experimental.get_device_details(gpus[0])
        capability = float(".".join(map(str, details.get("compute_capability", (0, 0)))))
        log.info("GPU: %s", gpu_diagnostics.describe_gpu(details))
    strategy = make_strategy(choice)
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    return choice, strategy, capability


def _apply_threads(choice: StrategyChoice) -> StrategyChoice:
    """Set TensorFlow's pools to `choice.cpu_threads` (0: its default). Intra-op always;
    inter-op only for one replica in one process: a replica's collective op blocks an inter-op
    thread until its peers arrive, so several replicas or workers keep TensorFlow's inter-op
    pool. In a process whose TensorFlow already runs (tests, a notebook) the pools are fixed:
    the choice then records the threads in effect, so config.json says what ran."""
    import tensorflow as tf

    threading = tf.config.threading
    try:
        threading.set_intra_op_parallelism_threads(choice.cpu_threads)
        if choice.num_devices == 1 and choice.kind != "multi_worker":
            threading.set_inter_op_parallelism_threads(choice.cpu_threads)
    except RuntimeError:  # already initialised
        actual = threading.get_intra_op_parallelism_threads()
        if actual != choice.cpu_threads:
            log.debug("TensorFlow already runs: keeping its %s CPU threads", actual or "default")
            return dataclasses.replace(
                choice,
                cpu_threads=actual,
                threads_why=f"cpu_threads {choice.cpu_threads or 'default'} -> "
                f"{actual or 'TensorFlow default'}: TensorFlow was already running in this process",
            )
    return choice


def set_precision(mixed: bool) -> None:
    import keras

    keras.config.set_dtype_policy("mixed_float16" if mixed else "float32")


# --------------------------------------------------------------------------------------------
# Keras 3.15 work-arounds (several replicas)

PATCHED_KERAS_NAMES = (
    "keras.src.backend.tensorflow.trainer.reduce_per_replica",
    "keras.src.backend.tensorflow.trainer._collective_all_reduce_multi_worker",
    "keras.Model._symbolic_build",
    "keras.Model._maybe_symbolic_build",
)


def work_around_keras_distributed_build(model: Any, strategy: Any, per_replica_batch: int) -> None:
    """Keras 3.15's `fit` and `evaluate` build the model by
    `strategy.reduce("MEAN", first_distributed_batch)` (`_maybe_symbolic_build`), which fails
    under MirroredStrategy when the first batch does not split evenly over the replicas ("Inputs
    to operation AddN ... must have the same size and shape": e.g. 13 validation examples on 2
    replicas, or --batch-size 33), and under MultiWorkerMirroredStrategy always ("Attempt to
    convert a value (PerReplica ...)", keras-team/keras#20585). Build it once from a local
    batch instead, for any strategy with more than one replica."""
    import tensorflow as tf

    with strategy.scope():
        model._symbolic_build(
            data_batch=(
                tf.zeros((per_replica_batch, 28, 28), tf.float32),
                tf.zeros((per_replica_batch,), tf.int64),
            )
        )
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None


def work_around_keras_multi_worker_reduce() -> None:
    """Under MultiWorkerMirroredStrategy Keras 3.15 reduces step logs (scalars) with
    `strategy.reduce("MEAN", v, axis=0)`, which fails on 0-d values ("Invalid reduction
    dimension 0"; keras-team/keras#20585, tensorflow/tensorflow#72388): reduce scalars with
    axis=None. Patched once per process, multi-worker runs only."""
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer

    if getattr(tf_trainer.reduce_per_replica, "_mnist_patched", False):
        return
    original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values: Any, strategy: Any, reduction: str) -> Any:
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(
            strategy
        ):

            def mean(v: Any) -> Any:
                rank = v.values[0].shape.rank if hasattr(v, "values") else v.shape.rank
                return strategy.reduce("MEAN", v, axis=0 if rank else None)

            return tf.nest.map_structure(mean, values)
        return original(values, strategy, reduction)

    reduce_per_replica._mnist_patched = True  # type: ignore[attr-defined]
    tf_trainer.reduce_per_replica = reduce_per_replica
