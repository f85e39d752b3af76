"""Install path: pyproject pins, the lock files `make` installs from, the Makefile's CPU/GPU choice
(with a fake `nvidia-smi` on PATH), and components/gpu_diagnostics (no TensorFlow needed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from components import gpu_diagnostics as gd
from tests.helpers import as_a_terminals_job

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TF_PIN = "2.21.0"

A100_L = "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-x)"
A100_QUERY = "NVIDIA A100-SXM4-40GB, 40960 MiB"


def fake_nvidia_smi(
    folder: Path, list_output: str = A100_L, query_output: str = A100_QUERY, exit_code: int = 0
) -> Path:
    """An `nvidia-smi` that answers -L and --query-gpu like the real one, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "list.txt").write_text(list_output + "\n")
    (folder / "query.txt").write_text(query_output + "\n")
    script = folder / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'here=$(dirname "$0")\n'
        f'if [ "$1" = "-L" ]; then cat "$here/list.txt"; exit {exit_code}; fi\n'
        f'case "$1" in --query-gpu=*) cat "$here/query.txt"; exit {exit_code};; esac\n'
        "exit 9\n"
    )
    script.chmod(0o755)
    return folder


@pytest.fixture
def gpu_path(tmp_path, monkeypatch):
    """PATH with a fake nvidia-smi listing one A100 first."""
    folder = fake_nvidia_smi(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return folder


@pytest.fixture
def no_gpu_path(tmp_path, monkeypatch):
    """PATH with no nvidia-smi at all."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    return empty


# --- components/gpu_diagnostics ------------------------------------------------------------


def test_diagnostics_module_does_not_import_tensorflow():
    code = (
        "import sys, components.gpu_diagnostics; sys.exit(1 if 'tensorflow' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


def test_nvidia_smi_gpus_reads_the_listing(gpu_path):
    assert gd.nvidia_smi_gpus() == ["GPU 0: NVIDIA A100-SXM4-40GB"]


def test_mig_lines_are_not_gpus(tmp_path, monkeypatch):
    listing = A100_L + "\n  MIG 1g.5gb     Device  0: (UUID: MIG-y)"
    folder = fake_nvidia_smi(tmp_path / "bin", list_output=listing)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    assert gd.nvidia_smi_gpus() == ["GPU 0: NVIDIA A100-SXM4-40GB"]


def test_no_message_when_tensorflow_sees_a_gpu(gpu_path):
    assert gd.explain_missing_gpu(1) is None


def test_no_message_without_nvidia_smi(no_gpu_path):
    assert gd.explain_missing_gpu(0) is None


def test_no_message_when_nvidia_smi_fails(tmp_path, monkeypatch):
    # e.g. "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver"
    folder = fake_nvidia_smi(tmp_path / "bin", list_output="NVIDIA-SMI has failed", exit_code=9)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    assert gd.explain_missing_gpu(0) is None


def _pretend_installed(monkeypatch, *names: str) -> None:
    monkeypatch.setattr(gd.platform, "system", lambda: "Linux")
    monkeypatch.setattr(gd, "_installed", lambda name: name in names)


def test_message_when_cuda_wheels_are_missing(gpu_path, monkeypatch):
    _pretend_installed(monkeypatch, "tensorflow")
    message = gd.explain_missing_gpu(0)
    assert message is not None and "\n" not in message
    assert "GPU 0: NVIDIA A100-SXM4-40GB" in message
    assert "TensorFlow sees no GPU" in message
    assert "CUDA/cuDNN libraries are missing" in message and "CPU build" in message
    assert "make distclean && make train GPU=1" in message
    assert f"pip install 'tensorflow[and-cuda]=={TF_PIN}'" in message


def test_message_names_the_cpu_only_wheel(gpu_path, monkeypatch):
    _pretend_installed(monkeypatch, "tensorflow-cpu")
    message = gd.explain_missing_gpu(0)
    assert "CPU-only tensorflow-cpu wheel" in message
    assert "make distclean && make train GPU=1" in message


def test_message_when_cuda_wheels_are_there_but_did_not_load(gpu_path, monkeypatch):
    _pretend_installed(monkeypatch, "tensorflow", *gd.CUDA_WHEELS)
    message = gd.explain_missing_gpu(0)
    assert "installed but did not load" in message and "driver supports CUDA 12" in message
    assert "make distclean && make train GPU=1" in message


def test_message_off_linux(gpu_path, monkeypatch):
    monkeypatch.setattr(gd.platform, "system", lambda: "Windows")
    assert "Linux only" in gd.explain_missing_gpu(0)


def test_message_counts_several_gpus(tmp_path, monkeypatch):
    listing = A100_L + "\nGPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-z)"
    folder = fake_nvidia_smi(tmp_path / "bin", list_output=listing)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    _pretend_installed(monkeypatch)
    message = gd.explain_missing_gpu(0)
    assert "nvidia-smi lists 2 GPUs (GPU 0: NVIDIA A100-SXM4-40GB, ...)" in message


def test_message_in_this_venv_names_the_real_cause(gpu_path):
    # This venv is the CPU build from requirements.lock: no CUDA wheels.
    if all(gd._installed(name) for name in gd.CUDA_WHEELS):
        pytest.skip("this venv has the GPU build")
    assert "CUDA/cuDNN libraries are missing" in gd.explain_missing_gpu(0)


def test_describe_gpu_with_memory_from_nvidia_smi(gpu_path):
    details = {"device_name": "NVIDIA A100-SXM4-40GB", "compute_capability": (8, 0)}
    assert gd.describe_gpu(details) == "NVIDIA A100-SXM4-40GB (compute capability 8.0, 40960 MiB)"


def test_describe_gpu_without_nvidia_smi(no_gpu_path):
    details = {"device_name": "NVIDIA A100", "compute_capability": (8, 0)}
    assert gd.describe_gpu(details) == "NVIDIA A100 (compute capability 8.0)"


def test_describe_gpu_memory_only_for_the_gpu_of_that_name(gpu_path):
    details = {"device_name": "NVIDIA H100 80GB HBM3", "compute_capability": (9, 0)}
    assert gd.describe_gpu(details) == "NVIDIA H100 80GB HBM3 (compute capability 9.0)"


def test_describe_gpu_with_little_detail(no_gpu_path):
    assert gd.describe_gpu({}) == "GPU"
    assert gd.describe_gpu({"device_name": "Tesla T4"}) == "Tesla T4"


# --- pyproject.toml and the lock files ---------------------------------------------------------


def _pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for line in requirements:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{line} is not pinned"
        pins[_norm(req.name)] = spec.version
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a `--generate-hashes` requirements file."""
    text = path.read_text().replace("\\\n", " ")
    entries = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)\s*(.*)", line)
        assert m, f"{path.name}: not a pinned requirement: {line[:80]}"
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", m.group(3))
        entries[_norm(m.group(1))] = (m.group(2), hashes)
    return entries


def test_requires_python_matches_the_pins():
    # numpy 2.4.6, matplotlib 3.11.2, pillow 13.0.0 and keras 3.15.1 have nothing for 3.10.
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"


def test_build_backend_understands_the_license_string():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"  # PEP 639: setuptools >= 77
    (setuptools,) = [
        Requirement(r)
        for r in PYPROJECT["build-system"]["requires"]
        if Requirement(r).name == "setuptools"
    ]
    assert setuptools.specifier.contains("77.0.0") and not setuptools.specifier.contains("76.9")


def test_extras_are_pinned():
    extras = PYPROJECT["project"]["optional-dependencies"]
    dev = _pins(extras["dev"])
    assert {"pytest", "ruff", "mypy", "pyyaml"} <= set(dev)
    assert extras["gpu"] == [f"tensorflow[and-cuda]=={TF_PIN}"]
    assert _pins(PYPROJECT["project"]["dependencies"])["tensorflow"] == TF_PIN


def test_lock_has_every_pin_of_pyproject_hashed():
    lock = _lock(ROOT / "requirements.lock")
    wanted = {
        **_pins(PYPROJECT["project"]["dependencies"]),
        **_pins(PYPROJECT["project"]["optional-dependencies"]["dev"]),
    }
    for name, version in wanted.items():
        assert name in lock, f"requirements.lock lacks {name}: run `make lock`"
        assert lock[name][0] == version, (
            f"requirements.lock has {name}=={lock[name][0]}, "
            f"pyproject.toml {version}: run `make lock`"
        )
    assert all(hashes for _, hashes in lock.values())
    assert "setuptools" in lock  # tensorflow needs it, and `pip install --no-build-isolation -e .`
    assert not any(name.startswith("nvidia-") for name in lock)


def test_gpu_lock_is_the_cpu_lock_plus_the_cuda_wheels():
    cpu = _lock(ROOT / "requirements.lock")
    gpu = _lock(ROOT / "requirements-gpu.lock")
    for name, (version, _) in cpu.items():
        assert gpu.get(name, (None,))[0] == version, f"{name}: the two locks disagree"
    extra = set(gpu) - set(cpu)
    assert extra and all(name.startswith("nvidia-") for name in extra)
    assert {_norm(n) for n in gd.CUDA_WHEELS} <= extra
    assert all(hashes for _, hashes in gpu.values())


def test_locks_say_how_to_regenerate_them():
    for name in ("requirements.lock", "requirements-gpu.lock"):
        assert "make lock" in (ROOT / name).read_text()[:300]


# --- Makefile: which build, a stamp per build, help -------------------------------------------

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def _make_n(*args: str, path: str | None = None) -> str:
    env = {**os.environ}
    if path is not None:
        env["PATH"] = path
    env.pop("GPU", None)
    done = subprocess.run(
        ["make", "-n", "-B", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _says_gpu(out: str) -> bool:
    assert out.count("venv: installing the ") == 1, out  # one line says which build
    if "--require-hashes -r requirements-gpu.lock" in out:
        assert "touch .venv/.installed-gpu" in out and "GPU build" in out
        return True
    assert "--require-hashes -r requirements.lock" in out
    assert "touch .venv/.installed-cpu" in out and "CPU build" in out
    return False


@needs_make
def test_make_gpu_1_installs_the_gpu_build():
    out = _make_n("train", "GPU=1")
    assert _says_gpu(out) and "asked for with GPU=1" in out
    assert "pip install -qq --no-deps --no-build-isolation -e ." in out
    assert ".venv/.installed-cpu ]; then" in out  # leaving the CPU build recreates the venv


@needs_make
def test_make_picks_the_gpu_build_when_nvidia_smi_lists_one(tmp_path):
    folder = fake_nvidia_smi(tmp_path / "bin", list_output="GPU 0: NVIDIA A100 (UUID: GPU-x)")
    out = _make_n("train", path=f"{folder}{os.pathsep}{os.environ['PATH']}")
    assert _says_gpu(out) and "nvidia-smi lists GPU 0: NVIDIA A100;" in out


@needs_make
def test_make_gpu_0_forces_the_cpu_build(tmp_path):
    folder = fake_nvidia_smi(tmp_path / "bin")
    out = _make_n("train", "GPU=0", path=f"{folder}{os.pathsep}{os.environ['PATH']}")
    assert not _says_gpu(out) and "asked for with GPU=0" in out
    assert ".venv/.installed-gpu ]; then" in out


@needs_make
def test_make_picks_the_cpu_build_when_nvidia_smi_fails(tmp_path):
    folder = fake_nvidia_smi(tmp_path / "bin", list_output="NVIDIA-SMI has failed", exit_code=9)
    out = _make_n("test", path=f"{folder}{os.pathsep}{os.environ['PATH']}")
    assert not _says_gpu(out) and "no NVIDIA GPU listed" in out


@needs_make
def test_make_refuses_a_bad_gpu_value():
    done = subprocess.run(
        ["make", "-n", "train", "GPU=yes"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0 and "GPU=yes" in done.stderr


@needs_make
@pytest.mark.parametrize("target", ["train", "predict IMAGE=d.png", "models", "clean"])
def test_make_refuses_an_empty_artifacts_dir(target):
    """Each target would read it its own way (train: ./artifacts, predict: /models/mnist):
    refused by all, before anything runs."""
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", *target.split(), "ARTIFACTS_DIR= "],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert "ARTIFACTS_DIR is empty: give a folder" in done.stderr


@needs_make
def test_make_help_lists_every_target_on_one_line():
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z_-]*):(?!=)", text, flags=re.MULTILINE))
    done = subprocess.run(
        ["make", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    listed = {}
    for line in done.stdout.splitlines():
        m = re.match(r"\s+make (\S+)\s+(\S.*)", line)
        if m:
            listed[m.group(1)] = m.group(2)
    assert {"lock", "venv", "train", "test"} <= targets
    assert targets <= set(listed), f"not in `make help`: {sorted(targets - set(listed))}"
    phony = set(re.search(r"^\.PHONY:(.*)$", text, flags=re.MULTILINE).group(1).split())
    assert targets <= phony


def test_tensorflow_is_imported_without_the_garbage_collector_running_through_it():
    """components/tf_import.py: no collection during the import, the collector on again after
    it, the imported objects frozen (later full collections skip them), imported once."""
    code = (
        "import gc, json\n"
        "from components.tf_import import import_tensorflow\n"
        "runs = []\n"
        "gc.callbacks.append(lambda phase, info: runs.append(info) if phase == 'start' else 0)\n"
        "seconds = import_tensorflow()\n"
        "print(json.dumps({'collections': len(runs), 'enabled': gc.isenabled(),\n"
        "    'frozen': gc.get_freeze_count(), 'seconds': seconds, 'again': import_tensorflow()}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["collections"] == 0
    assert result["enabled"] is True
    assert result["frozen"] > 100_000
    assert result["seconds"] > 0 and result["again"] == 0


def test_a_ctrl_c_swallowed_inside_tensorflows_import_is_raised_after_it(tmp_path):
    """A module deep in the import catches everything (a bare `except:` around an optional
    import) just as Ctrl-C lands: the command must still stop (exit 130 in the CLIs), not run
    on as if nothing had been pressed. A stand-in `tensorflow` does exactly that."""
    fake = tmp_path / "tensorflow"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import os, signal, time\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(1)\n"
        "except:  # noqa: E722\n"
        "    swallowed = True\n"
    )
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "from components.tf_import import import_tensorflow\n"
        "try:\n"
        "    import_tensorflow()\n"
        "except KeyboardInterrupt:\n"
        "    import tensorflow, signal\n"
        "    print('raised', tensorflow.swallowed, signal.getsignal(signal.SIGINT).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
        preexec_fn=as_a_terminals_job,
    ).stdout  # fmt: skip
    assert out.split() == ["raised", "True", "default_int_handler"]


# --- a real nvidia-smi: runs only on a machine with an NVIDIA driver -------------------------

needs_real_nvidia_smi = pytest.mark.skipif(
    shutil.which("nvidia-smi") is None, reason="no nvidia-smi: not a GPU machine"
)


@needs_real_nvidia_smi
def test_real_nvidia_smi_is_read_and_picks_the_gpu_build():
    """The fake nvidia-smi above imitates the real one's output; this checks the imitation against
    the real driver's: every GPU it lists is read, its memory is found by name, and `make` picks
    the GPU build for it."""
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    if listing.returncode != 0:
        pytest.skip(f"nvidia-smi is installed but answers nothing: {listing.stderr.strip()}")
    raw = listing.stdout
    listed = [line for line in raw.splitlines() if re.match(r"GPU \d+:", line)]
    gpus = gd.nvidia_smi_gpus()
    assert len(gpus) == len(listed) >= 1 and all("UUID" not in gpu for gpu in gpus), raw
    name = gpus[0].split(": ", 1)[1]
    memory = gd.nvidia_smi_memory()
    assert re.fullmatch(r"\d+ MiB", memory.get(name, "")), (name, memory)
    described = gd.describe_gpu({"device_name": name, "compute_capability": (9, 0)})
    assert described == f"{name} (compute capability 9.0, {memory[name]})"
    assert gpus[0] in (gd.explain_missing_gpu(0) or "")  # "2 GPUs (GPU 0: ..., ...)" for several
    if shutil.which("make"):
        out = _make_n("train")
        assert _says_gpu(out) and f"nvidia-smi lists {gpus[0]};" in out
