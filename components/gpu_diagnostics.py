"""GPU diagnostics for the trainer's device setup: why TensorFlow sees no GPU on a machine whose
`nvidia-smi` lists one, and a one-line description of a GPU TensorFlow does see.

TensorFlow is not imported here: the caller passes in what TensorFlow reported
(`len(tf.config.list_physical_devices("GPU"))`, `tf.config.experimental.get_device_details(gpu)`).
`nvidia-smi` is run with a timeout; when it is missing, fails or hangs, the answer is as if it
listed nothing.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import shutil
import subprocess
from typing import Any

TENSORFLOW_VERSION = "2.21.0"
REINSTALL_HINT = (
    f"run `make distclean && make train GPU=1` "
    f"(or `pip install 'tensorflow[and-cuda]=={TENSORFLOW_VERSION}'`)"
)
# Two of the wheels `tensorflow[and-cuda]` installs: without them TensorFlow finds no CUDA.
CUDA_WHEELS = ("nvidia-cudnn-cu12", "nvidia-cublas-cu12")
NVIDIA_SMI_TIMEOUT_S = 10.0


def _nvidia_smi(*args: str) -> list[str]:
    """The non-empty lines `nvidia-smi ARGS` prints; [] when it is absent, fails or hangs."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        done = subprocess.run(
            [exe, *args], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if done.returncode != 0:
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def nvidia_smi_gpus() -> list[str]:
    """The GPUs `nvidia-smi -L` lists, e.g. ["GPU 0: NVIDIA A100-SXM4-40GB"] (UUIDs dropped).
    MIG devices (indented `MIG ...` lines) are parts of a listed GPU, not GPUs of their own."""
    gpus = []
    for line in _nvidia_smi("-L"):
        if re.match(r"GPU \d+:", line):
            gpus.append(re.sub(r"\s*\(UUID:.*\)\s*$", "", line))
    return gpus


def nvidia_smi_memory() -> dict[str, str]:
    """GPU name -> total memory as `nvidia-smi --query-gpu=name,memory.total` says it
    ("81559 MiB"); {} when nvidia-smi does not answer."""
    memory: dict[str, str] = {}
    for line in _nvidia_smi("--query-gpu=name,memory.total", "--format=csv,noheader"):
        name, sep, total = line.rpartition(",")
        if sep and name.strip() and re.fullmatch(r"\d+(\.\d+)?\s*\w+", total.strip()):
            memory.setdefault(name.strip(), total.strip())
    return memory


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def explain_missing_gpu(tf_gpu_count: int) -> str | None:
    """One line saying why TensorFlow sees no GPU although `nvidia-smi -L` lists one, and what
    to run; None when TensorFlow sees a GPU or nvidia-smi lists none."""
    if tf_gpu_count > 0:
        return None
    gpus = nvidia_smi_gpus()
    if not gpus:
        return None
    listed = f"{gpus[0]}" if len(gpus) == 1 else f"{len(gpus)} GPUs ({gpus[0]}, ...)"
    system = platform.system()
    todo = REINSTALL_HINT
    if system != "Linux":
        why = (
            f"TensorFlow {TENSORFLOW_VERSION} publishes CUDA builds for Linux only, not for "
            f"{system} (on Windows, use WSL2)"
        )
    elif _installed("tensorflow-cpu"):
        why = "the CPU-only tensorflow-cpu wheel is installed"
    elif not all(_installed(name) for name in CUDA_WHEELS):
        why = (
            "the CUDA/cuDNN libraries are missing: this is the CPU build "
            "(tensorflow without [and-cuda])"
        )
    else:
        why = (
            "the CUDA/cuDNN wheels are installed but did not load (TensorFlow's log above "
            "names the library)"
        )
        todo = (
            "check that the NVIDIA driver supports CUDA 12 (`nvidia-smi` shows the CUDA "
            "version it supports; Linux driver >= 525), else reinstall: " + REINSTALL_HINT[4:]
        )
    return f"nvidia-smi lists {listed} but TensorFlow sees no GPU: {why}; {todo}"


def _compute_capability(value: Any) -> str | None:
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return f"{value[0]}.{value[1]}"
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def describe_gpu(details: dict) -> str:
    """ "NVIDIA A100-SXM4-40GB (compute capability 8.0, 40960 MiB)" from
    `tf.config.experimental.get_device_details(gpu)` ({"device_name": ..., "compute_capability":
    (8, 0)}), the memory from nvidia-smi for the GPU of that name, when it says so."""
    name = str(details.get("device_name") or "GPU")
    parts = []
    capability = _compute_capability(details.get("compute_capability"))
    if capability:
        parts.append(f"compute capability {capability}")
    if name != "GPU":
        memory = nvidia_smi_memory().get(name)
        if memory:
            parts.append(memory)
    return f"{name} ({', '.join(parts)})" if parts else name
