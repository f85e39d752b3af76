"""Version management for TF Serving: list, promote, canary, rollback; the generated config
parses as tensorflow-serving-api's ModelServerConfig; labelled versions are never pruned."""

import json
import os
import shutil
import signal

import pytest
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from components import exporter
from components.files import write_manifest
from pipeline import cli
from serving import versions
from tests.helpers import no_hang


@pytest.fixture
def three_versions(exported, tmp_path):
    base = tmp_path / "artifacts" / "models" / "mnist"
    for v in (1, 2, 3):
        shutil.copytree(exported, base / str(v))
        (base / str(v) / "assets.extra" / "model_card.json").write_text(
            json.dumps(
                {
                    "model_details": {"run_id": f"run-{v}", "date": f"2026-11-2{v}T10:00:00"},
                    "quantitative_analysis": {"accuracy": 0.97 + v / 1000},
                    "lineage": {"code": {"commit": f"{v}" * 40}, "data_fingerprint": "ab" * 16},
                }
            )
        )
        write_manifest(base / str(v))  # as publishing writes it
    return base


def _config(path):
    return text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())


def test_list_promote_canary_rollback(three_versions, capsys):
    base = three_versions
    artifacts = ["--artifacts-dir", str(base.parents[1])]
    assert cli.main(["models", "list", *artifacts]) == 0
    out = capsys.readouterr().out
    assert "run-3" in out and "0.9730" in out and "3333333333" in out
    assert cli.main(["models", "promote", "2", *artifacts, "--base-path", "/models/mnist"]) == 0
    assert cli.main(["models", "canary", "3", *artifacts, "--base-path", "/models/mnist"]) == 0
    config = _config(base.parent / versions.CONFIG_FILE).model_config_list.config[0]
    assert config.base_path == "/models/mnist"
    assert list(config.model_version_policy.specific.versions) == [2, 3]
    assert dict(config.version_labels) == {"stable": 2, "canary": 3}
    capsys.readouterr()
    assert cli.main(["models", "promote", "3", *artifacts]) == 0
    config = _config(base.parent / versions.CONFIG_FILE).model_config_list.config[0]
    assert dict(config.version_labels) == {"stable": 3}
    assert cli.main(["models", "rollback", *artifacts]) == 0
    assert versions.read_labels(base)["stable"] == 2
    assert cli.main(["models", "promote", "9", *artifacts]) == cli.EXIT_USAGE
    assert "version 9 is not published" in capsys.readouterr().err


def test_list_as_json(three_versions, capsys):
    assert (
        cli.main(["models", "list", "--json", "--artifacts-dir", str(three_versions.parents[1])])
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in rows] == [1, 2, 3]
    assert rows[0]["run_id"] == "run-1" and rows[2]["accuracy"] == pytest.approx(0.973)


def test_pruning_keeps_labelled_versions(three_versions, exported):
    base = three_versions
    versions.promote(base, 1)
    result = exporter.publish_staged(
        exported,
        base,
        run_id="r4",
        baseline_version=3,
        assets={},
        keep_versions=1,
        protected=lambda: versions.labelled(base),
        remembered=lambda: versions.remembered(base),
    )
    assert result.version == 4 and versions.published(base) == [1, 4]


def test_without_labels_the_latest_version_is_served(tmp_path):
    text = versions.model_server_config(versions.read_labels(tmp_path / "m"), "/models/mnist")
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    assert config.model_config_list.config[0].model_version_policy.latest.num_versions == 1


def test_the_client_addresses_a_label():
    from serving.client import RestClient

    assert (
        RestClient("localhost:8501", label="stable")._model_url()
        == "http://localhost:8501/v1/models/mnist/labels/stable"
    )
    assert (
        RestClient("localhost:8501", version=3)._model_url()
        == "http://localhost:8501/v1/models/mnist/versions/3"
    )


def test_local_predictions_run_the_version_tf_serving_would(three_versions, tmp_path, capsys):
    """`make predict` (in-process) answers with the version a plain request to TF Serving gets:
    the latest with no labels; the newest labelled one with labels (the `specific` policy);
    --label and --version as TF Serving resolves them."""
    import numpy as np

    from serving import cli as serving_cli
    from serving.client import local_model_dir
    from serving.inputs import InputError

    base = three_versions
    artifacts = ["--artifacts-dir", str(base.parents[1])]
    assert local_model_dir(base) == base / "3"
    capsys.readouterr()
    assert cli.main(["models", "promote", "1", *artifacts]) == 0
    assert capsys.readouterr().out.startswith("stable: 1, canary: -; wrote ")
    assert local_model_dir(base) == base / "1"  # 2 and 3 are not served
    assert cli.main(["models", "canary", "2", *artifacts]) == 0
    assert local_model_dir(base) == base / "2"
    assert local_model_dir(base, label="stable") == base / "1"
    assert local_model_dir(base, version=3) == base / "3"
    assert local_model_dir(base / "3") == base / "3"
    for bad in ({"version": 7}, {"label": "beta"}, {"version": 1, "label": "stable"}):
        with pytest.raises(InputError):
            local_model_dir(base, **bad)
    with pytest.raises(InputError, match="one SavedModel"):
        local_model_dir(base / "3", version=1)
    with pytest.raises(InputError, match=r"no version 7 under .* \(published: 1, 2, 3\)"):
        local_model_dir(base / "7")  # a version folder that is not there

    digit, pixels = tmp_path / "bar.npy", np.zeros((28, 28), np.uint8)
    pixels[4:24, 12:16] = 255  # a "1"
    np.save(digit, pixels)
    capsys.readouterr()
    assert serving_cli.main(["predict", str(digit), "--local", str(base), "--label", "stable"]) == 0
    assert f"local SavedModel {base / '1'}" in capsys.readouterr().out
    assert serving_cli.main(["predict", str(digit), "--local", str(base), "--version", "9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no version 9") and len(err.splitlines()) == 1, err


def test_a_full_disk_while_labelling_changes_nothing(three_versions, monkeypatch, capsys):
    import pathlib

    base = three_versions
    artifacts = ["--artifacts-dir", str(base.parents[1])]
    assert cli.main(["models", "promote", "2", *artifacts]) == 0
    before = {p.name: p.read_bytes() for p in base.parent.glob("*.*")}
    real = pathlib.Path.write_text

    def full(self, *a, **k):
        if self.name == f".{versions.CONFIG_FILE}.tmp":
            raise OSError(28, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    assert cli.main(["models", "promote", "3", *artifacts]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in base.parent.glob("*.*")} == before
    assert not list(base.parent.glob(".*.tmp"))


def test_a_version_that_would_not_serve_is_never_labelled(three_versions, capsys):
    """A damaged version (a file no longer as published), a folder that is not a SavedModel or
    one with no manifest to verify it by cannot be promoted or served as canary: TF Serving
    would fail to load what it is told to, or load a model nobody checked."""
    base = three_versions
    artifacts = ["--artifacts-dir", str(base.parents[1])]
    assert cli.main(["models", "promote", "1", *artifacts]) == 0
    (base / "4").mkdir()  # an empty version folder
    shutil.copytree(base / "1", base / "5")
    write_manifest(base / "5")  # as publishing writes it
    with open(base / "5" / "saved_model.pb", "r+b") as f:
        f.truncate(100)
    shutil.copytree(base / "1", base / "6")
    (base / "6" / "assets.extra" / "files_sha256.json").unlink()  # a SavedModel from elsewhere
    before = (base.parent / versions.CONFIG_FILE).read_text()
    capsys.readouterr()
    for action, version, says in (
        ("promote", "4", "version 4 would not serve (INCOMPLETE: no saved_model.pb)"),
        ("canary", "4", "version 4 would not serve (INCOMPLETE: no saved_model.pb)"),
        ("promote", "5", "version 5 would not serve (DAMAGED: saved_model.pb)"),
        ("canary", "5", "version 5 would not serve (DAMAGED: saved_model.pb)"),
        ("promote", "6", "version 6 cannot be verified"),
    ):
        assert cli.main(["models", action, version, *artifacts]) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert says in err and "nothing changed" in err and len(err.splitlines()) == 1, err
    assert (base.parent / versions.CONFIG_FILE).read_text() == before
    assert versions.read_labels(base)["stable"] == 1


def test_models_arguments_say_what_they_take(three_versions, capsys):
    base = three_versions
    artifacts = ["--artifacts-dir", str(base.parents[1])]
    assert cli.main(["models", "promote", "2", *artifacts]) == 0
    assert cli.main(["models", "canary", "3", *artifacts]) == 0
    capsys.readouterr()
    assert cli.main(["models", "canary", *artifacts]) == cli.EXIT_USAGE
    assert "needs a version number (or `none` to stop serving a canary)" in capsys.readouterr().err
    assert versions.read_labels(base)["canary"] == 3
    assert cli.main(["models", "canary", "none", *artifacts]) == 0
    assert versions.read_labels(base)["canary"] is None
    assert cli.main(["models", "rollback", "3", *artifacts]) == cli.EXIT_USAGE
    assert "models rollback takes no version" in capsys.readouterr().err
    assert cli.main(["models", "promote", "none", *artifacts]) == cli.EXIT_USAGE
    assert versions.read_labels(base)["stable"] == 2


@pytest.mark.parametrize("name", [versions.CONFIG_FILE, versions.LABELS_FILE])
def test_a_folder_where_a_labels_file_goes_is_one_line(three_versions, capsys, name):
    base = three_versions
    (base.parent / name).mkdir()
    code = cli.main(["models", "promote", "2", "--artifacts-dir", str(base.parents[1])])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        code == cli.EXIT_USAGE and len(err) == 1 and f"{base.parent / name} is not a file" in err[0]
    )
    assert (base.parent / name).is_dir() and not (base.parent / f".{name}.tmp").exists()


def _models(base, *args):
    """`python -m pipeline models ARGS` on `base`'s artifacts folder: (exit code, out, err)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["models", *args, "--artifacts-dir", str(base.parents[1])])
    return code, out.getvalue(), err.getvalue()


def _predict(base, tmp_path, *flags):
    """`python -m serving predict DIGIT --local base FLAGS`: (exit code, stderr lines)."""
    import contextlib
    import io

    import numpy as np

    from serving import cli as serving_cli

    digit, pixels = tmp_path / "digit.npy", np.zeros((28, 28), np.uint8)
    pixels[4:24, 12:16] = 255  # a "1"
    np.save(digit, pixels)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = serving_cli.main(["predict", str(digit), "--local", str(base), *flags])
    return code, err.getvalue().splitlines()


def _snapshot(base):
    """labels.json and models.config, as they are."""
    return {p.name: p.read_bytes() for p in base.parent.glob("*.*") if p.is_file()}


def _labelled_as_before(base, before):
    """Nothing was labelled: labels.json and models.config are as they were."""
    assert _snapshot(base) == before


@pytest.mark.parametrize(
    "name, card",
    [
        ("model_card.json", []),
        ("model_card.json", {"model_details": "x"}),
        ("model_card.json", {"lineage": [1]}),
        ("model_card.json", {"lineage": {"code": {"commit": 5}}}),
        ("model_card.json", {"quantitative_analysis": {"accuracy": True}}),
        ("metrics.json", [1]),  # no model card: the metrics are read instead
    ],
)
def test_a_model_card_of_the_wrong_shape_is_listed_as_unreadable(three_versions, name, card):
    base = three_versions
    extra = base / "3" / "assets.extra"
    if name == "metrics.json":
        (extra / "model_card.json").unlink()
    (extra / name).write_text(json.dumps(card))
    code, out, err = _models(base, "list")
    assert code == 0 and not err, err
    row = out.splitlines()[3]
    assert row.startswith("3 ") and "DAMAGED: assets.extra/" in row
    assert "(model card unreadable: " in row
    code, out, err = _models(base, "list", "--json")
    rows = json.loads(out)
    assert rows[2]["card"].startswith("unreadable: ") and rows[2]["commit"] is None
    assert rows[2]["accuracy"] is None and rows[0]["card"] == "ok" and rows[0]["run_id"] == "run-1"
    code, _, err = _models(base, "promote", "3")  # the manifest says the card changed
    assert code == cli.EXIT_USAGE and "version 3 would not serve (DAMAGED" in err


@pytest.mark.parametrize(
    "labels, wrong",
    [
        ({"stable": 2, "history": 5}, "history must be a list of version numbers, not 5"),
        ({"stable": True, "history": [1]}, "stable must be a version number or null, not true"),
        ({"stable": 2, "canary": "3"}, 'canary must be a version number or null, not "3"'),
        ({"stable": 2, "history": [1, False]}, "history must be a list of version numbers"),
        ({"stable": 0}, "stable must be a version number or null, not 0"),
        ([2], "expected a JSON object"),
    ],
)
def test_an_invalid_labels_file_is_one_line_naming_it(three_versions, tmp_path, labels, wrong):
    base = three_versions
    path = base.parent / versions.LABELS_FILE
    path.write_text(json.dumps(labels))
    before = _snapshot(base)
    for args in (["list"], ["promote", "3"], ["canary", "3"], ["rollback"]):
        code, out, err = _models(base, *args)
        lines = err.splitlines()
        assert code == cli.EXIT_USAGE and len(lines) == 1 and not out, (args, err)
        assert lines[0].startswith(f"error: {path} cannot be used ({wrong}")
        assert "delete it" in lines[0] and "`models promote N`" in lines[0]
    _labelled_as_before(base, before)
    assert versions.labelled(base) == {1, 2, 3}  # unreadable labels: nothing is pruned
    code, lines = _predict(base, tmp_path)
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {path} cannot be used"), (
        lines
    )


def test_labels_pointing_at_no_published_version_say_how_to_move_them(three_versions, tmp_path):
    base = three_versions
    path = base.parent / versions.LABELS_FILE
    path.write_text(json.dumps({"stable": 99, "canary": 98, "history": [97]}))
    code, out, err = _models(base, "list")
    assert code == 0 and not err
    assert "warning: label stable -> 99: that version is not published; `models promote" in out
    assert "warning: label canary -> 98: that version is not published; `models canary none`" in out
    code, out, err = _models(base, "list", "--json")
    assert [r["version"] for r in json.loads(out)] == [1, 2, 3] and "label stable -> 99" in err
    code, lines = _predict(base, tmp_path)
    assert code == 1 and len(lines) == 1
    assert "label stable points at version 99, which is not published" in lines[0]
    assert "models promote N` moves it" in lines[0]
    code, lines = _predict(base, tmp_path, "--label", "canary")
    assert code == 1 and "`python -m pipeline models canary none` clears it" in lines[0]
    code, _, err = _models(base, "promote", "3")
    assert code == cli.EXIT_USAGE and len(err.splitlines()) == 1
    assert "label canary points at version 98, which is not published" in err
    assert "`models canary none` clears it" in err
    code, _, err = _models(base, "rollback")
    assert code == cli.EXIT_USAGE and "nothing to roll back to" in err
    assert _models(base, "canary", "none")[0] == 0  # the way out, though stable is gone too
    assert _models(base, "promote", "3")[0] == 0
    assert versions.read_labels(base) == {"stable": 3, "canary": None, "history": [97, 99]}


def test_a_labelled_version_without_its_graph_is_named_with_the_way_out(three_versions, tmp_path):
    base = three_versions
    assert _models(base, "promote", "2")[0] == 0
    (base / "2" / "saved_model.pb").unlink()
    code, lines = _predict(base, tmp_path)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(
        f"error: version 2 (labelled stable) under {base} is incomplete: no saved_model.pb"
    )
    assert "models rollback` or `... models promote N`" in lines[0]
    code, lines = _predict(base, tmp_path, "--version", "2")
    assert code == cli.EXIT_USAGE and "that folder has no saved_model.pb" in lines[0]
    code, out, _ = _models(base, "list")
    assert "warning: label stable -> 2: that version is INCOMPLETE: no saved_model.pb" in out
    code, _, err = _models(base, "canary", "3")  # stable must move first
    assert code == cli.EXIT_USAGE and "label stable points at version 2, which would not" in err


def _flip(path, at=100, count=8):
    data = bytearray(path.read_bytes())
    data[at : at + count] = bytes(b ^ 0xFF for b in data[at : at + count])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "manifest, says",
    [
        ({}, "does not list saved_model.pb, variables/"),
        ([], "not a JSON object"),
        ({"saved_model.pb": "00"}, "'saved_model.pb': '00' is not a SHA-256"),
        ("only saved_model.pb", "does not list variables/variables.data-00000-of-00001"),
    ],
)
def test_a_manifest_that_vouches_for_too_little_is_damage(three_versions, manifest, says):
    from components.files import damaged_files

    base = three_versions
    path = base / "3" / "assets.extra" / "files_sha256.json"
    if manifest == "only saved_model.pb":
        manifest = {"saved_model.pb": json.loads(path.read_text())["saved_model.pb"]}
    path.write_text(json.dumps(manifest))
    _flip(base / "3" / "saved_model.pb")
    assert _models(base, "promote", "2")[0] == 0
    before = _snapshot(base)
    (damage,) = damaged_files(base / "3")
    assert damage.startswith("assets.extra/files_sha256.json (invalid: ") and says in damage
    code, out, _ = _models(base, "list")
    assert code == 0 and "DAMAGED: assets.extra/files_sha256.json (invalid" in out
    for action in ("promote", "canary"):
        code, _, err = _models(base, action, "3")
        assert code == cli.EXIT_USAGE and "version 3 would not serve (DAMAGED" in err
    _labelled_as_before(base, before)


def test_a_deleted_variables_folder_is_named_as_missing_not_blamed_on_the_manifest(
    three_versions,
):
    import shutil

    from components.files import damaged_files

    base = three_versions
    shutil.rmtree(base / "3" / "variables")
    damage = damaged_files(base / "3")
    assert damage and all(d.startswith("variables/") for d in damage), damage
    assert "variables/variables.index (No such file or directory)" in damage
    code, out, _ = _models(base, "list")
    assert code == 0 and "DAMAGED: variables/" in out


@pytest.mark.parametrize("remove", ["assets.extra/files_sha256.json", "assets.extra"])
def test_a_version_that_cannot_be_verified_is_never_labelled(three_versions, remove):
    """No manifest: a version published before manifests, or copied in by hand. It is listed
    and still served as the latest or compared with as a baseline (the trainer's gate), but
    never labelled: nothing vouches that its files are the ones validated."""
    from components.files import damaged_files

    base = three_versions
    target = base / "3" / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    data = base / "3" / "variables" / "variables.data-00000-of-00001"
    data.write_bytes(bytes(data.stat().st_size))  # zeroed weights: nothing can tell
    assert _models(base, "promote", "2")[0] == 0
    before = _snapshot(base)
    assert damaged_files(base / "3") is None  # unverified, not damaged: the trainer's view
    code, out, _ = _models(base, "list")
    assert code == 0 and "unverified: no SHA-256 manifest, never labelled" in out.splitlines()[3]
    for action in ("promote", "canary"):
        code, _, err = _models(base, action, "3")
        assert code == cli.EXIT_USAGE and len(err.splitlines()) == 1
        assert "version 3 cannot be verified" in err and "`make train`" in err
    _labelled_as_before(base, before)


def _replace_with(path, kind):
    import os

    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to(kind)


@pytest.mark.parametrize(
    "key, kind, says",
    [
        ("/dev/zero", None, "'/dev/zero' is not a path relative to the version folder"),
        ("../../../../etc/hostname", None, "is not a path relative to the version folder"),
        ("variables/../saved_model.pb", None, "is not a path relative to the version folder"),
        ("./saved_model.pb", None, "is not a path relative to the version folder"),
        ("zero", "/dev/zero", "zero (a link out of the version folder)"),
        ("zero", "fifo", "zero (not a regular file)"),
        ("zero", "folder", "zero (not a regular file)"),
        ("zero", "/etc/hostname", "zero (a link out of the version folder)"),
        ("assets.extra/files_sha256.json", "/dev/zero", "files_sha256.json (invalid: "),
    ],
)
def test_a_manifest_naming_anything_but_a_file_of_the_version_is_damage(
    three_versions, key, kind, says
):
    """Never opened (a device is read forever, a FIFO waits), never read outside the version,
    and the trainer's baseline check says so instead of hanging."""

    from components.files import damaged_files
    from components.infra_validator import BaselineDamaged
    from pipeline.stages import _check_baseline

    base = three_versions
    path = base / "3" / "assets.extra" / "files_sha256.json"
    manifest = json.loads(path.read_text())
    if kind is not None:
        _replace_with(base / "3" / key, kind)
    if key != "assets.extra/files_sha256.json":
        path.write_text(json.dumps({**manifest, key: "0" * 64}))

    def hung(*_):
        raise TimeoutError("damaged_files hangs")

    previous = signal.signal(signal.SIGALRM, hung)  # a hang fails the test, not the suite
    signal.alarm(60)
    try:
        assert any(says in d for d in damaged_files(base / "3")), damaged_files(base / "3")
        code, out, _ = _models(base, "list")
        assert code == 0 and "DAMAGED: " in out.splitlines()[3]
        assert _models(base, "promote", "3")[0] == cli.EXIT_USAGE
        with pytest.raises(BaselineDamaged):
            _check_baseline(base / "3")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("where", ["mnist", "models"])
@pytest.mark.parametrize("kind", ["file", "/nonexistent/x", "/dev/null"])
def test_a_models_folder_that_is_not_a_folder_is_one_line(tmp_path, where, kind):
    base = tmp_path / "artifacts" / "models" / "mnist"
    bad = base if where == "mnist" else base.parent
    bad.parent.mkdir(parents=True)
    bad.write_text("") if kind == "file" else bad.symlink_to(kind)
    what = "a link to nothing" if kind.startswith("/nonexistent") else "not a folder"
    for args in (["list"], ["promote", "3"], ["canary", "3"], ["rollback"]):
        code, out, err = _models(base, *args)
        assert code == cli.EXIT_USAGE and not out and len(err.splitlines()) == 1, (args, err)
        assert err.startswith(f"error: {bad} is {what}: the published versions go in the folder")
    code, lines = _predict(base, tmp_path)
    assert code == cli.EXIT_USAGE and lines == [
        f"error: --local: {bad} is {what}: give a SavedModel or a models folder"
    ]


def test_a_folder_where_the_publish_lock_goes_is_one_line(three_versions):
    base = three_versions
    assert _models(base, "promote", "1")[0] == 0 and _models(base, "promote", "2")[0] == 0
    before = _snapshot(base)
    (base / ".publish.lock").unlink()
    (base / ".publish.lock").mkdir()
    for args in (["promote", "3"], ["canary", "3"], ["rollback"]):
        code, _, err = _models(base, *args)
        assert code == cli.EXIT_USAGE and err == (
            f"error: cannot take the publish lock {base / '.publish.lock'}: it is a folder: "
            "remove it; nothing changed\n"
        )
    _labelled_as_before(base, before)


def test_a_named_pipe_where_the_publish_lock_goes_is_one_line(three_versions):
    base = three_versions
    assert _models(base, "promote", "1")[0] == 0
    before = _snapshot(base)
    (base / ".publish.lock").unlink()
    os.mkfifo(base / ".publish.lock")
    with no_hang(30):
        code, _, err = _models(base, "promote", "3")
    assert code == cli.EXIT_USAGE and err == (
        f"error: cannot take the publish lock {base / '.publish.lock'}: not a regular file "
        "(a lock file belongs there): remove it; nothing changed\n"
    )
    _labelled_as_before(base, before)


def test_a_zero_padded_folder_is_not_listed_as_a_version(three_versions):
    """ "007" is not a name the exporter writes: listed as 7 it would point at mnist/7, which
    is not there (models list said INCOMPLETE; a damaged-baseline error named that folder)."""
    from serving.client import latest_version

    shutil.copytree(three_versions / "3", three_versions / "007")
    assert versions.published(three_versions) == [1, 2, 3]
    assert latest_version(three_versions) == three_versions / "3"
    code, out, _ = _models(three_versions, "list")
    assert code == 0 and out.splitlines()[-1] == (
        f"warning: {three_versions / '007'} is not a version this product wrote, but TF Serving "
        f"reads it as version 7 (and may serve it): move it out of {three_versions}"
    )


def test_models_list_before_anything_is_published(tmp_path):
    code, out, err = _models(tmp_path / "artifacts" / "models" / "mnist", "list")
    assert code == 0 and "Traceback" not in err and "warning" not in out, (out, err)


def test_a_version_published_while_labels_pin_serving_says_it_is_not_served(three_versions, capsys):
    """With stable (and canary) labels set, TF Serving serves those: the run that publishes
    version 3 says it is not served yet and how to serve it; no labels, no such line."""
    from types import SimpleNamespace

    from pipeline import stages

    def announce():
        metrics = {
            "published_version": 3,
            "published_path": str(three_versions / "3"),
            "gate": {"reason": "test accuracy 0.9730 >= 0.9700"},
        }
        stages.announce(SimpleNamespace(metrics=metrics, models=three_versions), "publish")
        return capsys.readouterr().out.splitlines()

    assert len(announce()) == 1  # no labels: the latest version is served
    versions.promote(three_versions, 1)
    versions.canary(three_versions, 2)
    published, note = announce()
    assert published.startswith("Published version 3: ")
    assert note == (
        "Not served yet: the labels pin TF Serving to stable 1, canary 2; "
        '`make models ARGS="promote 3"` (or canary) serves this version'
    )
    versions.promote(three_versions, 3)
    assert len(announce()) == 1


def test_listing_an_empty_models_folder_says_nothing_is_published(tmp_path, capsys):
    assert cli.main(["models", "list", "--artifacts-dir", str(tmp_path / "a")]) == 0
    base = tmp_path / "a" / "models" / "mnist"
    assert capsys.readouterr().out == (
        f"no published version under {base} yet: `make train` publishes one\n"
    )
    assert cli.main(["models", "list", "--json", "--artifacts-dir", str(tmp_path / "a")]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_a_canary_on_the_stable_version_is_warned_about(three_versions, capsys):
    artifacts = ["--artifacts-dir", str(three_versions.parents[1])]
    assert cli.main(["models", "promote", "1", *artifacts]) == 0
    assert "warning" not in capsys.readouterr().out
    assert cli.main(["models", "canary", "1", *artifacts]) == 0
    said = "warning: canary and stable are both version 1: the canary compares nothing"
    assert said in capsys.readouterr().out
    assert cli.main(["models", "list", *artifacts]) == 0
    assert said in capsys.readouterr().out
    assert cli.main(["models", "canary", "2", *artifacts]) == 0
    assert "warning" not in capsys.readouterr().out


def test_a_rollback_onto_the_canary_version_is_warned_about(three_versions, capsys):
    artifacts = ["--artifacts-dir", str(three_versions.parents[1])]
    for action in (["promote", "1"], ["promote", "2"], ["canary", "1"]):
        assert cli.main(["models", *action, *artifacts]) == 0
    capsys.readouterr()
    assert cli.main(["models", "rollback", *artifacts]) == 0
    out = capsys.readouterr().out
    assert "stable: version 2 -> 1" in out
    assert "warning: canary and stable are both version 1" in out


def test_a_console_that_cannot_be_written_is_one_line_not_a_traceback(three_versions):
    """stdout on a full disk (`> /dev/full`, as `> answers.txt` on a full disk): the list and
    the client's answers are the commands' output, so they end in one line and a failing code;
    run as a user runs them, in their own processes."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    artifacts = str(three_versions.parents[1])
    from components.photo import example_photos

    photo = three_versions.parents[2] / "d.jpg"
    photo.write_bytes(example_photos()[0])  # the warmup's example photo, as the README makes one
    commands = {
        6: ["pipeline", "models", "list", "--artifacts-dir", artifacts],
        1: ["serving", "predict", str(photo), "--local", str(three_versions), "--json"],
    }
    for code, command in commands.items():
        with open("/dev/full", "w") as full:
            r = subprocess.run(
                [sys.executable, "-m", *command],
                cwd=ROOT,
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                timeout=120,
            )
        assert r.returncode == code, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1] == (
            "error: standard output could not be written (No space left on device): "
            "what the command printed was lost"
        ), r.stderr[-2000:]
        assert "Traceback" not in r.stderr


def test_list_warns_when_models_config_does_not_serve_what_the_labels_say(three_versions, capsys):
    """TF Serving follows models.config, the product labels.json: deleting one (as an error's
    advice once said), or editing one, must not leave them disagreeing unnoticed."""
    base = three_versions
    artifacts = ["--artifacts-dir", str(base.parents[1])]
    config, labels = base.parent / versions.CONFIG_FILE, base.parent / versions.LABELS_FILE
    assert cli.main(["models", "promote", "2", *artifacts]) == 0
    assert cli.main(["models", "canary", "3", *artifacts]) == 0
    capsys.readouterr()
    assert cli.main(["models", "list", *artifacts]) == 0
    assert "warning" not in capsys.readouterr().out  # written together: they agree
    written = config.read_text()
    config.unlink()  # labels set, TF Serving would serve the latest version
    assert cli.main(["models", "list", *artifacts]) == 0
    [line] = _warnings(capsys.readouterr().out)
    assert line == (
        f"warning: there is no {config}: `make serve` serves the latest version, not the "
        f"labels; `models promote N` writes it anew"
    )
    config.write_text(written)
    labels.unlink()
    assert cli.main(["models", "list", *artifacts]) == 0
    [line] = _warnings(capsys.readouterr().out)
    assert line == (
        f"warning: {config} has TF Serving serve versions [2, 3] (stable -> 2, canary -> 3), not "
        f"what labels.json says; `models promote N` writes it anew, or delete it and labels.json "
        f"to serve the latest"
    )
    config.write_text("model_config_list { config { name: 'mnist' ")
    assert cli.main(["models", "list", *artifacts]) == 0
    [line] = _warnings(capsys.readouterr().out)
    assert line.startswith(f"warning: {config} is not a config TF Serving can use (")
    config.unlink()  # both gone: the latest version is served, nothing to say
    assert cli.main(["models", "list", *artifacts]) == 0
    assert _warnings(capsys.readouterr().out) == []
    labels.write_text("{")
    assert cli.main(["models", "list", *artifacts]) == 2
    assert f"delete it and {versions.CONFIG_FILE} beside it" in capsys.readouterr().err


def _warnings(out):
    """The warning lines of `models list` (under its table, on stdout)."""
    return [line for line in out.splitlines() if line.startswith("warning")]
