"""Published versions for operators: list them with their model card facts, and serve them by
label the way TF Serving does (`version_labels` `stable` and `canary` over a `specific` version
policy in a generated ModelServerConfig), with promote, canary and rollback.

State: `<models>/../labels.json` ({"stable", "canary", "history"}); the generated config:
`<models>/../models.config`, rewritten atomically, which TF Serving re-reads when started with
`--model_config_file_poll_wait_seconds`. A version a label points to is never pruned.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MODEL_NAME = "mnist"
LABELS_FILE = "labels.json"
LABELS = ("stable", "canary")  # the version labels TF Serving is given
CONFIG_FILE = "models.config"


class VersionError(ValueError):
    """An operation on versions that cannot be done (a usage error)."""


def published(base: Path) -> list[int]:
    base = Path(base)
    if not base.is_dir():
        return []
    return sorted(
        int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0
    )


def _labels_path(base: Path) -> Path:
    return Path(base).parent / LABELS_FILE


def read_labels(base: Path) -> dict[str, Any]:
    path = _labels_path(base)
    if path.exists() and not path.is_file():
        raise VersionError(f"{path} is not a file; move it away to serve the latest version again")
    if not path.is_file():
        return {"stable": None, "canary": None, "history": []}
    try:
        value = json.loads(path.read_text())
        if not isinstance(value, dict):
            raise ValueError("expected a JSON object")
        labels = {
            "stable": value.get("stable"),
            "canary": value.get("canary"),
            "history": [v for v in value.get("history") or [] if isinstance(v, int)],
        }
        for key in LABELS:
            if labels[key] is not None and not isinstance(labels[key], int):
                raise ValueError(f"{key} must be a version number")
    except (OSError, ValueError) as e:
        raise VersionError(
            f"{path} is not readable ({e}); delete it to serve the latest version again"
        ) from None
    return labels


def labelled(base: Path) -> set[int]:
    """Versions a label points to: never deleted or renumbered."""
    try:
        labels = read_labels(base)
    except VersionError:
        return set(published(base))  # unreadable labels: protect everything
    return {v for v in (labels["stable"], labels["canary"]) if isinstance(v, int)}


def _card(version_dir: Path) -> dict[str, Any]:
    extra = version_dir / "assets.extra"
    for name in ("model_card.json", "metrics.json"):
        try:
            return json.loads((extra / name).read_text())
        except (OSError, ValueError):
            continue
    return {}


def list_versions(base: Path) -> list[dict[str, Any]]:
    labels = read_labels(base)
    rows = []
    for v in published(base):
        card = _card(Path(base) / str(v))
        details = card.get("model_details", {})
        quantitative = card.get("quantitative_analysis", {})
        lineage = card.get("lineage", {})
        rows.append(
            {
                "version": v,
                "labels": [k for k in LABELS if labels[k] == v],
                "accuracy": quantitative.get("accuracy", card.get("test_accuracy")),
                "date": details.get("date"),
                "run_id": details.get("run_id", card.get("run_id")),
                "commit": (lineage.get("code") or {}).get("commit"),
                "data_fingerprint": lineage.get("data_fingerprint"),
                "files": _files_state(Path(base) / str(v)),
            }
        )
    return rows


def _files_state(version_dir: Path) -> str:
    """ "ok" (every file as published), "DAMAGED: <files>", or "unverified" (published before
    versions carried their files' SHA-256)."""
    from components.files import damaged_files

    if not (Path(version_dir) / "saved_model.pb").is_file():
        return "INCOMPLETE: no saved_model.pb"
    damaged = damaged_files(version_dir)
    if damaged is None:
        return "unverified"
    return "ok" if not damaged else "DAMAGED: " + ", ".join(damaged)


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "version  labels         accuracy  date                 run id"
        "                          commit        data          files"
    ]
    for r in rows:
        accuracy = f"{r['accuracy']:.4f}" if isinstance(r["accuracy"], float) else "-"
        lines.append(
            f"{r['version']:<8} {','.join(r['labels']) or '-':<14} {accuracy:<9} "
            f"{r['date'] or '-':<20} {r['run_id'] or '-':<31} "
            f"{(r['commit'] or '-')[:12]:<13} {(r['data_fingerprint'] or '-')[:12]:<13} "
            f"{r['files']}"
        )
    return "\n".join(lines)


def model_server_config(labels: dict[str, Any], base_path: str) -> str:
    """ModelServerConfig text: the labelled versions (specific policy) or, with no labels,
    the latest version."""
    served = sorted({v for v in (labels["stable"], labels["canary"]) if isinstance(v, int)})
    if served:
        policy = "specific { " + " ".join(f"versions: {v}" for v in served) + " }"
        version_labels = "".join(
            f'\n    version_labels {{ key: "{k}" value: {labels[k]} }}'
            for k in LABELS
            if isinstance(labels[k], int)
        )
    else:
        policy, version_labels = "latest { num_versions: 1 }", ""
    return (
        "# Generated by `python -m pipeline models` (do not edit: promote/canary/rollback "
        "rewrite it).\n"
        "model_config_list {\n  config {\n"
        f'    name: "{MODEL_NAME}"\n    base_path: "{base_path}"\n'
        f'    model_platform: "tensorflow"\n    model_version_policy {{ {policy} }}'
        f"{version_labels}\n  }}\n}}\n"
    )


def _write(base: Path, labels: dict[str, Any], base_path: str | None) -> Path:
    """Under the publish lock (the exporter's `.publish.lock`): a publish that prunes reads the
    labels under the same lock, so it never deletes a version being labelled."""
    import fcntl

    lock = Path(base) / ".publish.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        for v in (labels["stable"], labels["canary"]):
            if v is not None:
                _require(base, v)  # not pruned while we waited for the lock
        return _write_locked(base, labels, base_path)


def _write_locked(base: Path, labels: dict[str, Any], base_path: str | None) -> Path:
    """Both files written whole under temporary names first, then renamed (TF Serving polls the
    config: never half-written); a full disk leaves both as they were."""
    root = Path(base).parent
    files = {
        root / LABELS_FILE: json.dumps(labels, indent=2) + "\n",
        root / CONFIG_FILE: model_server_config(labels, base_path or str(Path(base).resolve())),
    }
    for path in files:
        if path.exists() and not path.is_file():
            raise VersionError(f"{path} is not a file; move it away; nothing changed")
    tmps = {path: path.with_name(f".{path.name}.tmp") for path in files}
    try:
        for path, text in files.items():
            tmps[path].write_text(text)
    except OSError as e:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise VersionError(f"could not write {root}: {e.strerror or e}; nothing changed") from None
    for path, tmp in tmps.items():
        os.replace(tmp, path)
    return root / CONFIG_FILE


def _unparsable(saved_model_pb: Path) -> str | None:
    """Why TF Serving's loader would reject this saved_model.pb at once (it does not parse as
    a SavedModel, or has no graph with a serving_default signature), else None."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    model = saved_model_pb2.SavedModel()
    try:
        model.ParseFromString(saved_model_pb.read_bytes())
    except (OSError, DecodeError) as e:
        return f"saved_model.pb does not parse ({type(e).__name__})"
    if not any("serving_default" in graph.signature_def for graph in model.meta_graphs):
        return "saved_model.pb has no serving_default signature"
    return None


def _require(base: Path, version: int) -> None:
    """`version` is published and its files are as published (TF Serving would load it)."""
    if version not in published(base):
        raise VersionError(
            f"version {version} is not published under {base} (published: "
            f"{', '.join(map(str, published(base))) or 'none'})"
        )
    state = _files_state(Path(base) / str(version))
    if state == "unverified":  # no SHA-256 to check against (e.g. a SavedModel from elsewhere)
        problem = _unparsable(Path(base) / str(version) / "saved_model.pb")
        state = f"INCOMPLETE: {problem}" if problem else state
    if state.startswith(("DAMAGED", "INCOMPLETE")):
        raise VersionError(
            f"version {version} would not serve ({state}); nothing changed: "
            f"publish it again, or pick another (`models list`)"
        )


def promote(base: Path, version: int, base_path: str | None = None) -> Path:
    """`version` becomes stable (the previous stable is remembered for rollback)."""
    _require(base, version)
    labels = read_labels(base)
    if labels["stable"] is not None and labels["stable"] != version:
        labels["history"].append(labels["stable"])
    labels["stable"] = version
    if labels["canary"] == version:
        labels["canary"] = None
    return _write(base, labels, base_path)


def canary(base: Path, version: int | None, base_path: str | None = None) -> Path:
    """Serve `version` as canary beside stable (None removes the canary)."""
    labels = read_labels(base)
    if version is not None:
        _require(base, version)
        if labels["stable"] is None:
            raise VersionError("promote a stable version first: a canary runs beside stable")
    labels["canary"] = version
    return _write(base, labels, base_path)


def rollback(base: Path, base_path: str | None = None) -> tuple[int, int, Path]:
    """stable goes back to the previous stable. Returns (from, to, config path)."""
    labels = read_labels(base)
    while labels["history"]:
        previous = labels["history"].pop()
        if previous in published(base):
            current = labels["stable"]
            labels["stable"] = previous
            return current, previous, _write(base, labels, base_path)
    raise VersionError("nothing to roll back to: no earlier stable version is still published")
