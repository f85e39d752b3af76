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
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and is_version_name(p.name))


def is_version_name(name: str) -> bool:
    """A version folder's name as the exporter writes it: a positive number, no leading zero
    (a "007" is not listed as 7: its path would not be mnist/7)."""
    return name.isdigit() and name == str(int(name)) and int(name) > 0


def not_a_folder(path: Path) -> str | None:
    """Why `path` (or a folder above it) cannot hold versions: a file, a device, a link to
    nothing; None when it is a folder or is not there at all (nothing published yet)."""
    for p in (*reversed(Path(path).parents), Path(path)):
        if p.is_dir():
            continue
        if os.path.lexists(p):
            what = "a link to nothing" if not p.exists() else "not a folder"
            return f"{p} is {what}"
        return None
    return None


def check_base(base: Path) -> None:
    """The models folder is a folder, or not there yet (a file there would read as "nothing
    published", and a publish or a label would fail on it later)."""
    problem = not_a_folder(base)
    if problem:
        raise VersionError(
            f"{problem}: the published versions go in the folder {base}; move it away "
            f"(`make train` publishes there again)"
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
        from components.files import read_regular

        labels = _valid_labels(json.loads(read_regular(path)))
    except (OSError, ValueError, RecursionError) as e:
        raise VersionError(
            f"{path} cannot be used ({e}); fix it, or delete it and {CONFIG_FILE} beside it "
            f"to serve the latest version again (`models promote N` then writes both anew)"
        ) from None
    return labels


def _shown(value: Any) -> str:
    """A JSON value as the file has it, cut short."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_version(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0  # True is no 1


def _valid_labels(value: Any) -> dict[str, Any]:
    """`value` as labels, else ValueError saying what is wrong: stable and canary a version
    number or null, history a list of version numbers."""
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    labels = {key: value.get(key) for key in LABELS}
    for key in LABELS:
        if labels[key] is not None and not _is_version(labels[key]):
            raise ValueError(f"{key} must be a version number or null, not {_shown(labels[key])}")
    history = value.get("history", [])
    if not isinstance(history, list) or not all(_is_version(v) for v in history):
        raise ValueError(f"history must be a list of version numbers, not {_shown(history)}")
    return {**labels, "history": list(history)}


def labelled(base: Path) -> set[int]:
    """Versions a label points to: never deleted or renumbered."""
    try:
        labels = read_labels(base)
    except VersionError:
        return set(published(base))  # unreadable labels: protect everything
    return {v for v in (labels["stable"], labels["canary"]) if isinstance(v, int)}


def remembered(base: Path) -> set[int]:
    """Version numbers the labels point at or remember (history), published or deleted since:
    never given to another model. Unreadable labels remember nothing (`models list` and the
    serving config say what is wrong with them)."""
    try:
        labels = read_labels(base)
    except VersionError:
        return set()
    return {v for v in (labels["stable"], labels["canary"]) if v} | set(labels["history"])


def _card(version_dir: Path) -> tuple[dict[str, Any], str | None]:
    """The version's model card (or, for an older version, its metrics) and, when the file
    there cannot be read as one, why not."""
    from components.files import read_regular

    extra = version_dir / "assets.extra"
    for name in ("model_card.json", "metrics.json"):
        if not os.path.lexists(extra / name):
            continue
        try:
            card = json.loads(read_regular(extra / name))
        except (OSError, ValueError, RecursionError) as e:
            return {}, f"{name} unreadable ({e})"
        return (card, None) if isinstance(card, dict) else ({}, f"{name} is not a JSON object")
    return {}, None


def _card_fields(card: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The list's facts from a card, each None where the card does not hold it in the shape
    the model card writes (and then named among the problems)."""
    problems: list[str] = []

    def part(parent: dict[str, Any], key: str, where: str) -> dict[str, Any]:
        value = parent.get(key, {})
        if isinstance(value, dict):
            return value
        problems.append(f"{where}{key} is not an object")
        return {}

    def fact(parent: dict[str, Any], key: str, where: str, kinds: tuple[type, ...]) -> Any:
        value = parent.get(key)
        if value is None or (isinstance(value, kinds) and not isinstance(value, bool)):
            return value
        problems.append(f"{where}{key} is {_shown(value)}")
        return None

    details, lineage = part(card, "model_details", ""), part(card, "lineage", "")
    quantitative = part(card, "quantitative_analysis", "")
    code = part(lineage, "code", "lineage.")
    number = (float, int)
    fields = {
        "accuracy": fact(quantitative, "accuracy", "quantitative_analysis.", number)
        if "accuracy" in quantitative
        else fact(card, "test_accuracy", "", number),
        "date": fact(details, "date", "model_details.", (str,)),
        "run_id": fact(details, "run_id", "model_details.", (str,))
        if "run_id" in details
        else fact(card, "run_id", "", (str,)),
        "commit": fact(code, "commit", "lineage.code.", (str,)),
        "data_fingerprint": fact(lineage, "data_fingerprint", "lineage.", (str,)),
    }
    return fields, problems


def list_versions(base: Path) -> list[dict[str, Any]]:
    check_base(base)
    labels = read_labels(base)
    rows = []
    for v in published(base):
        card, problem = _card(Path(base) / str(v))
        fields, problems = _card_fields(card)
        if problem:
            problems.insert(0, problem)
        rows.append(
            {
                "version": v,
                "labels": [k for k in LABELS if labels[k] == v],
                **fields,
                "files": _files_state(Path(base) / str(v)),
                "card": "unreadable: " + "; ".join(problems) if problems else "ok",
            }
        )
    return rows


def label_warnings(base: Path, rows: list[dict[str, Any]]) -> list[str]:
    """A line for each label that points at a version that is not published or would not
    serve (TF Serving would be told to load it), and for each folder with a number for a name
    that is not a version written here ("007", "0": TF Serving would take it for one)."""
    labels, states = read_labels(base), {r["version"]: r["files"] for r in rows}
    fixes = {"stable": "`models promote N` moves it", "canary": "`models canary none` clears it"}
    warnings = []
    for key in LABELS:
        v = labels[key]
        if v is None or states.get(v, "").startswith(("ok", "unverified")):
            continue
        what = f"is {states[v]}" if v in states else "is not published"
        warnings.append(f"warning: label {key} -> {v}: that version {what}; {fixes[key]}")
    warnings += same_version_warning(labels)
    warnings += config_warnings(base, labels)
    versions = {str(r["version"]) for r in rows}
    for p in sorted(Path(base).iterdir()) if Path(base).is_dir() else []:
        if p.is_dir() and p.name.isascii() and p.name.isdigit() and p.name not in versions:
            warnings.append(
                f"warning: {p} is not a version this product wrote, but TF Serving reads it as "
                f"version {int(p.name)} (and may serve it): move it out of {base}"
            )
    return warnings


def config_warnings(base: Path, labels: dict[str, Any]) -> list[str]:
    """A line when the generated models.config, which TF Serving follows (`make serve`), does
    not parse or does not serve what labels.json says (one of them deleted or edited by hand)."""
    path = Path(base).parent / CONFIG_FILE
    want = {k: labels[k] for k in LABELS if isinstance(labels[k], int)}
    if not path.is_file():
        if not want or path.exists():  # (a folder there: `make models` refuses it itself)
            return []
        return [
            f"warning: there is no {path}: `make serve` serves the latest version, not the "
            f"labels; `models promote N` writes it anew"
        ]
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    redo = f"`models promote N` writes it anew, or delete it and {LABELS_FILE} to serve the latest"
    try:
        config = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
        [model] = config.model_config_list.config
    except (OSError, ValueError, text_format.ParseError) as e:
        return [f"warning: {path} is not a config TF Serving can use ({e}); {redo}"]
    policy = model.model_version_policy
    says = (sorted(policy.specific.versions), dict(model.version_labels))
    if says == (sorted(set(want.values())), want):
        return []
    shown = ", ".join(f"{k} -> {v}" for k, v in sorted(says[1].items(), key=_label_order))
    shown = shown or "no labels"
    serves = f"versions {says[0]}" if says[0] else "the latest version"
    return [
        f"warning: {path} has TF Serving serve {serves} ({shown}), not what {LABELS_FILE} "
        f"says; {redo}"
    ]


def _label_order(item: tuple[str, int]) -> tuple[int, str]:
    """stable, canary, then any other label a hand put there."""
    return (LABELS.index(item[0]) if item[0] in LABELS else len(LABELS), item[0])


def same_version_warning(labels: dict[str, Any]) -> list[str]:
    """A canary on the stable version (e.g. after a rollback to it) compares nothing."""
    if labels["canary"] is None or labels["canary"] != labels["stable"]:
        return []
    return [
        f"warning: canary and stable are both version {labels['stable']}: the canary compares "
        f"nothing; `models canary N` moves it, `models canary none` clears it"
    ]


UNVERIFIED = "unverified: no SHA-256 manifest, never labelled"


def _files_state(version_dir: Path) -> str:
    """ "ok" (every file as published), "DAMAGED: <files>", "INCOMPLETE: ..." or UNVERIFIED
    (published before versions carried their files' SHA-256, or not by `make train`)."""
    from components.files import damaged_files

    if not (Path(version_dir) / "saved_model.pb").is_file():
        return "INCOMPLETE: no saved_model.pb"
    damaged = damaged_files(version_dir)
    if damaged is None:
        return UNVERIFIED
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
            f"{r['files']}" + ("" if r["card"] == "ok" else f" (model card {r['card']})")
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


def _write(
    base: Path, labels: dict[str, Any], base_path: str | None, verify: tuple[str, ...] = LABELS
) -> Path:
    """Under the publish lock (the exporter's `.publish.lock`): a publish that prunes reads the
    labels under the same lock, so it never deletes a version being labelled. The `verify`
    labels must point at versions that would serve."""
    from components.files import holding, lock_refusal, open_lock

    lock = Path(base) / ".publish.lock"
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        held = open_lock(lock)  # (a named pipe there would block `open`)
    except OSError as e:
        raise VersionError(
            lock_refusal(e, "the publish lock", lock) + "; nothing changed"
        ) from None
    with holding(held):
        for key in verify:  # each still published (not pruned while we waited for the lock)
            if labels[key] is not None:
                _require(base, labels[key], key)
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


# How to point a label elsewhere when the version it points at cannot be kept.
_MOVE_LABEL = {
    "stable": "`models promote N` or `models rollback` moves it",
    "canary": "`models canary none` clears it",
}


def _require(base: Path, version: int, label: str | None = None) -> None:
    """`version` is published and its files are as published (TF Serving would load it). With
    `label`: the version that label already points at, which is then named with the way out."""
    pointed = f"label {label} points at version {version}, which" if label else ""
    if version not in published(base):
        raise VersionError(
            f"{pointed or f'version {version}'} is not published under {base} (published: "
            f"{', '.join(map(str, published(base))) or 'none'})"
            + (f"; nothing changed: {_MOVE_LABEL[label]}" if label else "")
        )
    state = _files_state(Path(base) / str(version))
    if state == UNVERIFIED:  # no SHA-256 to check against (e.g. a SavedModel from elsewhere)
        raise VersionError(
            f"{pointed or f'version {version}'} cannot be verified (it has no "
            f"assets.extra/files_sha256.json); nothing changed: "
            + (_MOVE_LABEL[label] if label else "publish it with `make train` to label it")
        )
    if state.startswith(("DAMAGED", "INCOMPLETE")):
        raise VersionError(
            f"{pointed or f'version {version}'} would not serve ({state}); nothing changed: "
            + (_MOVE_LABEL[label] if label else "publish it again, or pick another (`models list`)")
        )


def promote(base: Path, version: int, base_path: str | None = None) -> Path:
    """`version` becomes stable (the previous stable is remembered for rollback)."""
    check_base(base)
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
    check_base(base)
    labels = read_labels(base)
    if version is not None:
        _require(base, version)
        if labels["stable"] is None:
            raise VersionError("promote a stable version first: a canary runs beside stable")
    labels["canary"] = version
    # Clearing the canary is always possible: it is the way out of a canary label pointing at
    # a version that is gone, even while stable points at one too (promote then moves stable).
    return _write(base, labels, base_path, LABELS if version is not None else ())


def rollback(base: Path, base_path: str | None = None) -> tuple[int, int, Path]:
    """stable goes back to the previous stable. Returns (from, to, config path)."""
    check_base(base)
    labels = read_labels(base)
    while labels["history"]:
        previous = labels["history"].pop()
        if previous in published(base):
            current = labels["stable"]
            labels["stable"] = previous
            return current, previous, _write(base, labels, base_path)
    raise VersionError("nothing to roll back to: no earlier stable version is still published")
