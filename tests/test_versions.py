"""Version management for TF Serving: list, promote, canary, rollback; the generated config
parses as tensorflow-serving-api's ModelServerConfig; labelled versions are never pruned."""

import json
import shutil

import pytest
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from components import exporter
from components.files import write_manifest
from pipeline import cli
from serving import versions


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
    """A damaged version (a file no longer as published) or a folder that is not a SavedModel
    cannot be promoted or served as canary: TF Serving would fail to load what it is told to."""
    base = three_versions
    artifacts = ["--artifacts-dir", str(base.parents[1])]
    assert cli.main(["models", "promote", "1", *artifacts]) == 0
    (base / "4").mkdir()  # an empty version folder
    shutil.copytree(base / "1", base / "5")
    write_manifest(base / "5")  # as publishing writes it
    with open(base / "5" / "saved_model.pb", "r+b") as f:
        f.truncate(100)
    shutil.copytree(base / "1", base / "6")  # no checksums (a SavedModel from elsewhere)
    with open(base / "6" / "saved_model.pb", "r+b") as f:
        f.truncate(1000)
    before = (base.parent / versions.CONFIG_FILE).read_text()
    capsys.readouterr()
    for action, version, state in (
        ("promote", "4", "INCOMPLETE: no saved_model.pb"),
        ("canary", "4", "INCOMPLETE: no saved_model.pb"),
        ("promote", "5", "DAMAGED: saved_model.pb"),
        ("canary", "5", "DAMAGED: saved_model.pb"),
        ("promote", "6", "INCOMPLETE: saved_model.pb does not parse (DecodeError)"),
    ):
        assert cli.main(["models", action, version, *artifacts]) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert f"version {version} would not serve ({state}" in err and "nothing changed" in err
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
