"""deploy/: the training image, the Kubeflow TFJob and the TF Serving manifests. The commands in
them are parsed by the CLI's own parser, so a renamed or removed flag breaks a test here, and the
paths they share (the volume, the models folder, the serving config) are checked against each
other and against serving/."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml

from pipeline.cli import build_parser, resolve_config
from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
ENTRYPOINT = ["python", "-m", "pipeline"]


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[command]


def parse_cli(argv: list[str], where: str):
    """The CLI's parse of `python -m pipeline ARGV`; a flag it does not know fails the test.
    Flags must be spelled in full: argparse would also take a prefix of a renamed flag."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse's error(): exit 2 with a message on stderr
        pytest.fail(
            f"{where}: `python -m pipeline {shlex.join(argv)}` is not a valid command "
            f"of pipeline/cli.py (exit {e.code})"
        )
    known = _subparser(parser, args.command)._option_string_actions
    for token in argv[1:]:
        if token == "--":
            break
        if token.startswith("--"):
            assert token.split("=", 1)[0] in known, (
                f"{where}: {token} is not a flag of `python -m pipeline {args.command}`"
            )
    if args.command == "train":
        try:
            resolve_config(args)
        except ConfigError as e:
            pytest.fail(f"{where}: {e}")
    return args


def load_all(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    lines, current = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.lstrip().startswith("#"):
            continue
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        instruction, _, rest = current.strip().partition(" ")
        lines.append((instruction.upper(), rest.strip()))
        current = ""
    return lines


def exec_form(instructions, name: str) -> list[str]:
    values = [rest for ins, rest in instructions if ins == name]
    assert values, f"the Dockerfile has no {name}"
    value = json.loads(values[-1])  # the last one wins; the exec (JSON) form, no shell
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


# --- the training image ------------------------------------------------------------------------


def test_the_image_runs_the_cli_with_real_flags():
    instructions = dockerfile()
    assert exec_form(instructions, "ENTRYPOINT") == ENTRYPOINT
    cmd = exec_form(instructions, "CMD")
    args = parse_cli(cmd, "deploy/Dockerfile CMD")
    assert args.command == "train"


def test_the_image_installs_from_the_locks_with_hashes():
    instructions = dockerfile()
    text = " ".join(rest for _, rest in instructions)
    assert re.search(
        r"^VARIANT=cpu$",
        next(rest for ins, rest in instructions if ins == "ARG" and rest.startswith("VARIANT")),
    )
    copies = " ".join(rest for ins, rest in instructions if ins == "COPY")
    for lock in ("requirements.lock", "requirements-gpu.lock"):
        assert (ROOT / lock).is_file() and lock in copies
        assert f"{lock}" in text
    assert "cpu) lock=requirements.lock" in text and "gpu) lock=requirements-gpu.lock" in text
    assert 'pip install --require-hashes -r "$lock"' in text
    assert "pip install --no-deps --no-build-isolation ." in text
    # The locks are resolved for Python 3.11 (`make lock`); the base image must match.
    assert "ARG PYTHON_VERSION=3.11" in (DEPLOY / "Dockerfile").read_text()
    assert "--python-version 3.11" in (ROOT / "Makefile").read_text()


def test_the_image_copies_every_package_pyproject_installs():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]
    copied = {rest.split()[0] for ins, rest in dockerfile() if ins == "COPY"}
    assert set(packages) <= copied, f"not copied into the image: {set(packages) - copied}"


# --- the TFJob ---------------------------------------------------------------------------------


def _tfjob():
    job = one(load_all("tfjob.yaml"), "TFJob")
    assert job["apiVersion"] == "kubeflow.org/v1"
    return job


def _container(pod_spec: dict, name: str) -> dict:
    (container,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return container


def test_tfjob_trains_with_the_cli_real_flags():
    worker = _tfjob()["spec"]["tfReplicaSpecs"]["Worker"]
    container = _container(worker["template"]["spec"], "tensorflow")  # the operator's name
    assert container["command"] == ENTRYPOINT  # the image's entrypoint, said explicitly
    args = parse_cli([str(a) for a in container["args"]], "deploy/tfjob.yaml")
    assert args.command == "train"
    assert args.run_name, "--run-name is what lets a restarted job resume"
    assert worker["replicas"] >= 2
    assert worker["restartPolicy"] == "OnFailure"
    assert not any(e.get("name") == "TF_CONFIG" for e in container.get("env", [])), (
        "the TFJob operator sets TF_CONFIG"
    )
    assert {"name": "tfjob-port", "containerPort": 2222} in container["ports"]


def _mount_of(pod_spec: dict, container: dict, path: str) -> tuple[dict, dict]:
    """The (volumeMount, volume) that holds `path` in the container."""
    mounts = [
        m for m in container["volumeMounts"] if PurePosixPath(path).is_relative_to(m["mountPath"])
    ]
    assert mounts, f"{path} is on no mounted volume"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def _shared_claim() -> str:
    pvc = one(load_all("storage.yaml"), "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # workers and servers on many nodes
    return pvc["metadata"]["name"]


def _artifacts_on_the_volume() -> tuple[str, PurePosixPath]:
    """(claim name, artifacts dir relative to the volume's root) of the TFJob."""
    pod = _tfjob()["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]
    container = _container(pod, "tensorflow")
    args = parse_cli([str(a) for a in container["args"]], "deploy/tfjob.yaml")
    artifacts = PurePosixPath(str(args.artifacts_dir))
    mount, volume = _mount_of(pod, container, str(artifacts))
    assert "persistentVolumeClaim" in volume, "the artifacts must be on the shared volume"
    assert not mount.get("readOnly")
    relative = artifacts.relative_to(mount["mountPath"])
    on_volume = PurePosixPath(mount.get("subPath", "")) / relative
    return volume["persistentVolumeClaim"]["claimName"], on_volume


def test_tfjob_writes_its_artifacts_to_the_shared_volume():
    claim, _ = _artifacts_on_the_volume()
    assert claim == _shared_claim()


def test_tfjob_reads_its_other_paths_from_mounted_volumes():
    pod = _tfjob()["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]
    container = _container(pod, "tensorflow")
    args = parse_cli([str(a) for a in container["args"]], "deploy/tfjob.yaml")
    for path in (args.tfds_manual_dir, args.tfds_data_dir):
        if path is not None:
            _mount_of(pod, container, str(path))


def test_the_run_name_is_valid_and_resumable():
    container = _container(
        _tfjob()["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"], "tensorflow"
    )
    args = parse_cli([str(a) for a in container["args"]], "deploy/tfjob.yaml")
    assert args.run_name != "latest"


# --- TF Serving --------------------------------------------------------------------------------


def _serving():
    docs = load_all("tf-serving.yaml")
    return one(docs, "Deployment"), one(docs, "Service")


def _serving_release() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.startswith("tensorflow-serving-api==")]
    return pin.split("==")[1]


def test_serving_image_is_the_pinned_release_everywhere():
    deployment, _ = _serving()
    container = _container(deployment["spec"]["template"]["spec"], "tf-serving")
    image = f"tensorflow/serving:{_serving_release()}"
    assert container["image"] == image
    serve_sh = (ROOT / "serving" / "serve.sh").read_text()
    assert f"TF_SERVING_IMAGE=${{TF_SERVING_IMAGE:-{image}}}" in serve_sh
    from components.infra_validator import TF_SERVING_IMAGE

    assert image == TF_SERVING_IMAGE  # what infra validation runs when Docker is used
    code = "\n".join(line for line in serve_sh.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"\stensorflow/serving\s", code), "an unpinned image in serve.sh"


def test_serving_ports_grpc_8500_rest_8501():
    deployment, service = _serving()
    container = _container(deployment["spec"]["template"]["spec"], "tf-serving")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 8500, "http": 8501}
    flags = dict(a.split("=", 1) for a in container["args"] if "=" in a)
    assert flags["--port"] == "8500" and flags["--rest_api_port"] == "8501"
    assert {(p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        (8500, "grpc"),
        (8501, "http"),
    }
    selector = service["spec"]["selector"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def _base_path() -> str:
    m = re.search(r'base_path:\s*"([^"]+)"', (ROOT / "serving" / "models.config").read_text())
    assert m
    return m.group(1)


def test_serving_mounts_the_published_models_read_only_at_the_base_path():
    deployment, _ = _serving()
    pod = deployment["spec"]["template"]["spec"]
    container = _container(pod, "tf-serving")
    base_path = _base_path()
    assert base_path == "/models/mnist"
    mount, volume = _mount_of(pod, container, base_path)
    assert mount["mountPath"] == base_path and mount["readOnly"] is True
    claim, artifacts = _artifacts_on_the_volume()
    assert volume["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}
    # The folder the TFJob's chief publishes to: ARTIFACTS_DIR/models/mnist.
    assert PurePosixPath(mount["subPath"]) == artifacts / "models" / "mnist"


def test_serving_reads_the_config_files_of_serving():
    deployment, _ = _serving()
    pod = deployment["spec"]["template"]["spec"]
    container = _container(pod, "tf-serving")
    flags = dict(a.split("=", 1) for a in container["args"] if "=" in a)
    config_name = None
    for flag, filename in (
        ("--model_config_file", "models.config"),
        ("--batching_parameters_file", "batching.config"),
        ("--monitoring_config_file", "monitoring.config"),
    ):
        path = PurePosixPath(flags[flag])
        assert path.name == filename and (ROOT / "serving" / filename).is_file()
        mount, volume = _mount_of(pod, container, str(path))
        assert mount.get("readOnly") is True and "configMap" in volume
        config_name = volume["configMap"]["name"]
    # batching off by default: a bad request must not fail the requests batched with it
    assert "--enable_batching" not in container["args"]
    # The documented command that makes that ConfigMap from serving/.
    header = (DEPLOY / "tf-serving.yaml").read_text()
    m = re.search(r"kubectl create configmap (\S+)((?: --from-file=\S+)+)", header)
    assert m and m.group(1) == config_name
    files = {PurePosixPath(f).name for f in re.findall(r"--from-file=(\S+)", m.group(2))}
    assert files == {"models.config", "batching.config", "monitoring.config"}
    for f in re.findall(r"--from-file=(\S+)", m.group(2)):
        assert (ROOT / f).is_file()


# ---------------------------------------------------------------------- make serve, as it runs

_RECORDER = """#!/bin/sh
# a stand-in for {name}: records how it was started (argv, one per line) and the config files
# it was given, then exits as a stopped server would
[ "$1" = info ] && exit {info}
printf '%s\\n' "$@" > "{out}/argv"
for a in "$@"; do
  case "$a" in --model_config_file=*) cp "${{a#*=}}" "{out}/models.config" 2>/dev/null ;; esac
  case "$a" in *:/config:ro) cp "${{a%%:*}}/models.config" "{out}/models.config" ;; esac
done
exit 0
"""


# A stand-in server that stays up (up to 30 s) until its config file holds version labels,
# keeps that config as models.config.after, and exits: what TF Serving's poll would read.
_FOLLOWER = """#!/bin/sh
[ "$1" = info ] && exit {info}
printf '%s\\n' "$@" > "{out}/argv"
config=
for a in "$@"; do
  case "$a" in --model_config_file=/config/*) ;; --model_config_file=*) config="${{a#*=}}" ;; esac
  case "$a" in *:/config:ro) config="${{a%%:*}}/models.config" ;; esac
done
for i in $(seq 300); do
  if grep -q version_labels "$config" 2>/dev/null; then
    cp "$config" "{out}/models.config.after"; exit 0
  fi
  sleep 0.1
done
exit 1
"""


def _serve(
    tmp_path: Path,
    fakes: dict[str, int],
    stand_in: str | None = None,
    then=None,
    folder: str = "artifacts",
) -> tuple[object, Path]:
    """`make serve` with only these stand-ins on PATH (name -> exit code of `name info`);
    `then(artifacts)` runs once the stand-in has started."""
    import shutil
    import subprocess
    import time

    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    # Only what serve.sh uses, and the stand-ins: a real tensorflow_model_server or docker
    # installed on this machine (TF Serving's apt package puts one in /usr/bin) stays out.
    tools = ("bash", "sh", "env", "sed", "dirname", "ls", "mktemp", "cp", "cat", "mv", "rm")
    for tool in (*tools, "cmp", "sleep", "seq", "grep"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    for name, info in fakes.items():
        (bin_dir / name).write_text((stand_in or _RECORDER).format(name=name, out=out, info=info))
        (bin_dir / name).chmod(0o755)
    artifacts = tmp_path / folder
    (artifacts / "models" / "mnist" / "1").mkdir(parents=True)
    proc = subprocess.Popen(
        [shutil.which("make"), "--no-print-directory", "serve", f"ARTIFACTS_DIR={artifacts}"],
        cwd=ROOT,
        env={"PATH": str(bin_dir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if then is not None:
        deadline = time.monotonic() + 30
        while not (out / "argv").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        then(artifacts)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), out


def _model_config(path: Path):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())


@pytest.mark.parametrize("folder", ["artifacts", "a#b&c d"])  # characters sed would misread
def test_make_serve_starts_the_binary_on_the_published_models(tmp_path, folder):
    r, out = _serve(tmp_path, {"tensorflow_model_server": 0}, folder=folder)
    assert r.returncode == 0, r.stderr
    argv = (out / "argv").read_text().splitlines()
    assert {"--port=8500", "--rest_api_port=8501"} <= set(argv)
    assert f"--monitoring_config_file={ROOT / 'serving' / 'monitoring.config'}" in argv
    assert "--enable_batching" not in argv  # off by default (serving/batching.config says why)
    (config,) = _model_config(out / "models.config").model_config_list.config
    assert config.name == "mnist"
    assert config.base_path == str(tmp_path / folder / "models" / "mnist")
    assert sorted(p.name for p in (tmp_path / folder / "models").iterdir()) == [
        "mnist",
        "models.local.config",
    ]  # no temporary copy left


def test_make_serve_runs_the_pinned_image_in_docker_without_the_binary(tmp_path):
    r, out = _serve(tmp_path, {"docker": 0})
    assert r.returncode == 0, r.stderr
    argv = (out / "argv").read_text().splitlines()
    assert argv[0] == "run" and "tensorflow/serving:2.21.0" in argv
    models = tmp_path / "artifacts" / "models" / "mnist"
    assert f"{models}:/models/mnist:ro" in argv
    assert "--model_config_file=/config/models.config" in argv
    (config,) = _model_config(out / "models.config").model_config_list.config
    assert config.base_path == "/models/mnist"


@pytest.mark.parametrize("server", ["tensorflow_model_server", "docker"])
def test_labels_set_while_make_serve_runs_reach_the_server(tmp_path, server):
    """Started with no labels (the latest version), then `make models promote` writes
    models.config (here with another machine's base_path, as --base-path does): the config the
    running server polls gets the labels, with this machine's (or the container's) path."""
    from serving import versions

    def promote(artifacts):
        labels = {"stable": 1, "canary": None, "history": [1]}
        text = versions.model_server_config(labels, "/somewhere/else/mnist")
        (artifacts / "models" / "models.config").write_text(text)

    r, out = _serve(tmp_path, {server: 0}, stand_in=_FOLLOWER, then=promote)
    assert r.returncode == 0, r.stderr
    (config,) = _model_config(out / "models.config.after").model_config_list.config
    models = tmp_path / "artifacts" / "models" / "mnist"
    assert config.base_path == (str(models) if server != "docker" else "/models/mnist")
    assert dict(config.version_labels) == {"stable": 1}
    assert list(config.model_version_policy.specific.versions) == [1]


def test_make_serve_with_neither_says_how_and_fails(tmp_path):
    r, out = _serve(tmp_path, {"docker": 1})  # a docker command whose engine does not answer
    assert r.returncode == 2 and "Error 1" in r.stderr
    assert "neither tensorflow_model_server nor a running Docker engine was found" in r.stderr
    assert not (out / "argv").exists()
