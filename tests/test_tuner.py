"""Hyperparameter search: runs, resumes without re-running, starts over, never sees the test
split, logs hparams per trial, and feeds `train --hparams`."""

import json
import re
import time

import pytest
import tensorflow_datasets as tfds
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.hparams import plugin_data_pb2

from components import data as data_lib
from components import tuner
from pipeline import cli
from pipeline.config import TrainConfig, small_config
from pipeline.run import Paths, train_pipeline
from tests.helpers import make_digits


@pytest.fixture
def train_split():
    return data_lib.validate_split(make_digits(400, seed=3))


def _config(**kw):
    defaults = TrainConfig()
    base = dict(
        study="s",
        algorithm="random",
        max_trials=2,
        max_epochs=2,
        time_budget_minutes=5,
        steps_per_execution=4,
        validation_fraction=defaults.validation_fraction,
        seed=defaults.seed,
    )
    return tuner.TuneConfig(**{**base, **kw})


def test_search_writes_best_resumes_without_rerunning_and_overwrite_starts_over(
    tmp_path, train_split, capsys
):
    lines = []
    first = tuner.tune(_config(), train_split, tmp_path / "s", out=lines.append)
    assert len(first.trials_run) == 2
    best = json.loads((tmp_path / "s" / tuner.BEST_FILE).read_text())
    assert set(best["hparams"]) == {
        "hidden_units",
        "dropout",
        "learning_rate",
        "batch_size",
        "epochs",
    }
    assert best["objective"] == "val_loss"
    assert best["score"] == min(t["score"] for t in best["trials"])
    assert 0.0 <= best["val_accuracy"] <= 1.0
    # the training runs' own held-out split (same default fraction, same seed)
    assert best["validation"] == {
        "fraction": 0.05,
        "seed": 0,
        "train_examples": 380,
        "validation_examples": 20,
    }
    assert any(
        re.match(
            r"trial 0 completed: val_loss \d+\.\d{4} \(val_accuracy [01]\.\d{4}\), "
            r"best so far \d+\.\d{4}; \d+ s elapsed, \d+ s of budget left",
            line,
        )
        for line in lines
    )

    again = tuner.tune(_config(), train_split, tmp_path / "s", out=lines.append)
    assert again.trials_run == [] and any("resuming study s: 2 trial(s)" in l for l in lines)
    assert "Reloading Tuner" not in capsys.readouterr().out  # keras-tuner's own, said above
    more = tuner.tune(_config(max_trials=3), train_split, tmp_path / "s", out=lines.append)
    assert len(more.trials_run) == 1 and more.trials_run[0] not in first.trials_run

    lines.clear()
    fresh = tuner.tune(_config(overwrite=True), train_split, tmp_path / "s", out=lines.append)
    assert len(fresh.trials_run) == 2 and "--overwrite" in lines[0]
    assert len(json.loads((tmp_path / "s" / tuner.BEST_FILE).read_text())["trials"]) == 2


def test_hyperband_runs_and_trial_logs_carry_hparams(tmp_path, train_split):
    result = tuner.tune(
        _config(algorithm="hyperband", max_trials=3, max_epochs=2),
        train_split,
        tmp_path / "h",
        out=lambda _: None,
    )
    assert 1 <= len(result.trials_run) <= 3
    for trial_id in result.trials_run:
        acc = ea.EventAccumulator(str(tmp_path / "h" / "tensorboard" / trial_id / "execution0"))
        acc.Reload()
        start = plugin_data_pb2.HParamsPluginData.FromString(
            acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
        ).session_start_info
        assert {"hidden_units", "dropout", "learning_rate", "batch_size"} <= set(start.hparams)


def test_time_budget_stops_cleanly_between_trials(tmp_path, train_split):
    with pytest.raises(tuner.NoTrialCompleted, match="raise --time-budget"):
        tuner.tune(
            _config(time_budget_minutes=1e-9), train_split, tmp_path / "t", out=lambda _: None
        )


def test_tune_cli_never_asks_for_the_test_split(tmp_path, monkeypatch, capsys):
    asked = []
    real = data_lib.load_split

    def spy(split, **kw):
        asked.append(split)
        return real(split, **kw)

    monkeypatch.setattr(data_lib, "load_split", spy)
    with tfds.testing.mock_data(num_examples=120):
        code = cli.main(
            [
                "tune",
                "--artifacts-dir",
                str(tmp_path),
                "--algorithm",
                "random",
                "--max-trials",
                "1",
                "--max-epochs",
                "1",
                "--device",
                "cpu",
            ]
        )
    assert code == 0 and asked == ["train"]
    assert (tmp_path / "tuning" / "default" / tuner.BEST_FILE).is_file()
    assert 'make train ARGS="--hparams' in capsys.readouterr().out


def test_training_reads_best_hparams_into_its_config(tmp_path, tiny_data):
    best = {
        "hparams": {
            "hidden_units": 48,
            "dropout": 0.2,
            "learning_rate": 0.004,
            "batch_size": 64,
            "epochs": 2,
        },
        "score": 0.9,
    }
    path = tmp_path / tuner.BEST_FILE
    path.write_text(json.dumps(best))
    args = cli.build_parser().parse_args(["train", "--hparams", str(path), "--device", "cpu"])
    config = cli.resolve_config(args)
    small = small_config().to_dict()
    config = config.replace(
        **{
            k: small[k]
            for k in ("max_train_examples", "max_test_examples", "min_accuracy", "max_regression")
        }
    )
    result = train_pipeline(config, Paths(tmp_path / "artifacts"), data=tiny_data)
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert {k: saved["requested"][k] for k in best["hparams"]} == best["hparams"]
    assert result.metrics["epochs_trained"] == 2


def test_best_epoch_counts_the_epochs_a_continued_hyperband_trial_inherited():
    from types import SimpleNamespace

    def trial(values, best_step, score=0.9):
        return SimpleNamespace(
            hyperparameters=SimpleNamespace(values=values), best_step=best_step, score=score
        )

    assert tuner.best_epoch(trial({"tuner/initial_epoch": 7, "tuner/epochs": 20}, 4)) == 12
    assert tuner.best_epoch(trial({}, 4)) == 5
    assert tuner.best_epoch(trial({}, 0, score=None)) is None


def test_a_study_that_runs_fewer_trials_than_asked_says_why(tmp_path, train_split):
    lines: list[str] = []
    result = tuner.tune(
        _config(algorithm="hyperband", max_trials=40, max_epochs=2),
        train_split,
        tmp_path / "s",
        out=lines.append,
    )
    assert len(result.trials_run) < 40
    [stopped] = [line for line in lines if line.startswith("search stopped:")]
    assert f"holds {len(result.trials_run)} trial(s), fewer than --max-trials 40" in stopped


def test_a_truncated_study_file_is_one_line_with_advice(tmp_path, train_split, capsys, monkeypatch):
    from pipeline import cli

    artifacts = tmp_path / "artifacts"
    tuner.tune(
        _config(max_trials=1), train_split, artifacts / "tuning" / "s", out=lambda line: None
    )
    oracle = next((artifacts / "tuning" / "s").rglob("oracle.json"))
    oracle.write_text(oracle.read_text()[:40])
    monkeypatch.setattr("components.data.load_split", lambda *a, **k: make_digits(400, seed=3))
    code = cli.main(
        [
            "tune",
            "--study",
            "s",
            "--artifacts-dir",
            str(artifacts),
            "--algorithm",
            "random",
            "--max-trials",
            "2",
            "--max-epochs",
            "1",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_USAGE and len(err) == 1
    assert str(oracle) in err[0] and "--overwrite" in err[0]


@pytest.mark.parametrize("fraction", ["0", "0.000001"])
def test_a_search_without_a_validation_split_is_refused_in_one_line(
    tmp_path, capsys, monkeypatch, fraction
):
    """The search selects on held-out examples: none (0, or a fraction that leaves none of
    400) is a usage error before any trial, not a KeyError on val_loss."""
    from pipeline import cli

    monkeypatch.setattr("components.data.load_split", lambda *a, **k: make_digits(400, seed=3))
    artifacts = tmp_path / "artifacts"
    code = cli.main(
        ["tune", "--study", "v", "--artifacts-dir", str(artifacts), "--algorithm", "random",
         "--max-trials", "1", "--max-epochs", "1", "--device", "cpu",
         "--validation-fraction", fraction]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_USAGE and len(err) == 1, err
    assert "--validation-fraction" in err[0]
    assert not (artifacts / "tuning" / "v").exists()


def test_the_bayesian_search_the_readme_shows_runs(tmp_path, train_split):
    """keras-tuner's BayesianOptimization needs scipy, which keras-tuner does not declare."""
    result = tuner.tune(
        _config(algorithm="bayesian", max_trials=1, max_epochs=1),
        train_split,
        tmp_path / "s",
        out=lambda line: None,
    )
    assert len(result.trials_run) == 1 and result.best["score"] is not None


def _tune_cli(artifacts, study="d"):
    return cli.main(
        ["tune", "--study", study, "--artifacts-dir", str(artifacts), "--algorithm", "random",
         "--max-trials", "2", "--max-epochs", "1", "--device", "cpu"]
    )  # fmt: skip


@pytest.mark.parametrize("error", ["OSError", "ResourceExhaustedError"])
def test_a_full_disk_during_a_search_is_exit_6_in_one_line(tmp_path, capsys, monkeypatch, error):
    """keras-tuner's state files fail to write part-way through the search (its writer raises
    an OSError, TensorFlow's file API a ResourceExhaustedError): one line saying what to do,
    the publish/write exit code, no traceback."""
    import errno

    import tensorflow as tf
    from keras_tuner.src import utils as kt_utils

    real = kt_utils.save_json
    calls = []

    def fills_up(path, obj):
        calls.append(path)
        if len(calls) > 2:
            if error == "OSError":
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            raise tf.errors.ResourceExhaustedError(None, None, f"{path}; No space left on device")
        return real(path, obj)

    monkeypatch.setattr(kt_utils, "save_json", fills_up)
    monkeypatch.setattr("components.data.load_split", lambda *a, **k: make_digits(400, seed=3))
    code = _tune_cli(tmp_path / "artifacts")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(calls) == 3, "the search went on after the disk filled up"
    assert code == cli.EXIT_PUBLISH and len(err) == 1, err
    assert "No space left on device" in err[0]
    assert "disk full? free space and run the same command again: the study goes on" in err[0]


def test_a_study_path_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    artifacts = tmp_path / "artifacts"
    (artifacts / "tuning").mkdir(parents=True)
    (artifacts / "tuning" / "d").write_text("not a folder")
    code = _tune_cli(artifacts)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_USAGE and len(err) == 1, err
    assert "tuning/d exists and is not a folder" in err[0]
    assert (artifacts / "tuning" / "d").read_text() == "not a folder"


def test_a_temporary_copy_left_by_a_kill_is_not_called_damaged_state(tmp_path):
    """A kill while best_hparams.json was written leaves its hidden temporary copy; that is
    not keras-tuner's state, so the study is not called damaged (nor --overwrite advised)."""
    from components.tuner import unreadable_state_file

    study = tmp_path / "study"
    (study / "trial_0000").mkdir(parents=True)
    (study / "oracle.json").write_text("{}")
    (study / "trial_0000" / "trial.json").write_text("{}")
    (study / ".tmp-best_hparams.json").write_text('{"half": ')
    assert unreadable_state_file(study) is None
    (study / "trial_0000" / "trial.json").write_text('{"half": ')
    assert unreadable_state_file(study) == study / "trial_0000" / "trial.json"


@pytest.fixture(scope="module")
def a_study(tmp_path_factory):
    """One completed trial, searched once: each damage test changes a copy of it."""
    study = tmp_path_factory.mktemp("study") / "d"
    split = data_lib.validate_split(make_digits(400, seed=3))
    tuner.tune(_config(max_trials=1, max_epochs=1), split, study, out=lambda line: None)
    return study


def _drop(key):
    return lambda state: {k: v for k, v in state.items() if k != key}


# file -> what is written into it, from keras-tuner's own state -> what the line says
DAMAGES = {
    "ids only": ("trial", lambda s: {"trial_id": "0001", "status": 7}, "no key 'hyperparameters'"),
    "empty object": ("trial", lambda s: {}, "no key 'trial_id'"),
    "a list": ("trial", lambda s: [], "holds a list where keras-tuner writes an object"),
    "null hyperparameters": (
        "trial",
        lambda s: {**s, "hyperparameters": None},
        "'hyperparameters' is null where keras-tuner writes an object",
    ),
    "status a number": ("trial", lambda s: {**s, "status": 7}, "'status' is a number"),
    "no metric history": (
        "trial",
        lambda s: {**s, "metrics": {"metrics": {"val_loss": {}}}},
        "not a keras-tuner trial: KeyError: 'direction'",
    ),
    "oracle without a key": ("oracle", _drop("tried_so_far"), "no key 'tried_so_far'"),
    "oracle's nested key": (
        "oracle",
        lambda s: {**s, "display": {}},
        "no key 'display.search_start'",
    ),
    "oracle's unknown ongoing trial": (
        "oracle",
        lambda s: {**s, "ongoing_trials": {"tuner0": "7"}},
        "ongoing trial '7' has no trial.json",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_state_file_of_the_wrong_shape_is_one_line_with_advice(
    tmp_path, a_study, capsys, monkeypatch, damage
):
    """A trial.json or oracle.json that parses but lacks what keras-tuner reads back (a key, a
    type) is reported as a truncated one is: the file, what is wrong, --overwrite, exit 2, no
    traceback (keras-tuner's own KeyError names neither the file nor the key)."""
    import shutil

    which, change, says = DAMAGES[damage]
    study = tmp_path / "artifacts" / "tuning" / "d"
    shutil.copytree(a_study, study)
    path = next(study.rglob("oracle.json" if which == "oracle" else "trial.json"))
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    monkeypatch.setattr("components.data.load_split", lambda *a, **k: make_digits(400, seed=3))
    code = _tune_cli(tmp_path / "artifacts")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_USAGE and len(err) == 1, err
    assert f"{path} is corrupt (" in err[0] and says in err[0], err[0]
    assert "run again with --overwrite" in err[0] and "restore that file" in err[0]


@pytest.mark.parametrize("score", [None, float("nan")])
def test_a_trial_whose_every_val_loss_was_nan_is_valid_state(
    tmp_path, a_study, capsys, monkeypatch, score
):
    """keras-tuner saves such a trial as INVALID with best_step null (its best of NaNs is
    none) and a null or NaN score: the study goes on; it is not called corrupt."""
    import shutil

    study = tmp_path / "artifacts" / "tuning" / "d"
    shutil.copytree(a_study, study)
    path = next(study.rglob("trial.json"))
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "best_step": None, "score": score, "status": "INVALID"}))
    tuner._checked_trial(path)  # (raises DamagedStudy if not)
    monkeypatch.setattr("components.data.load_split", lambda *a, **k: make_digits(400, seed=3))
    code = _tune_cli(tmp_path / "artifacts")
    err = capsys.readouterr().err
    assert code == 0 and "corrupt" not in err, err
    best = json.loads((study / "best_hparams.json").read_text())
    [nan_trial] = [t for t in best["trials"] if t["trial_id"] == state["trial_id"]]
    assert nan_trial["best_epoch"] is None  # (it was a TypeError while writing the table)


def test_what_keras_tuner_raises_past_the_checks_names_the_study(
    tmp_path, a_study, capsys, monkeypatch
):
    """The safety net: state the checks let through that keras-tuner still fails to reload
    (here a start time that is not one) is one line naming the study's folder, not a
    traceback."""
    import shutil

    study = tmp_path / "artifacts" / "tuning" / "d"
    shutil.copytree(a_study, study)
    oracle = study / "keras_tuner" / "oracle.json"
    state = json.loads(oracle.read_text())
    oracle.write_text(json.dumps({**state, "display": {**state["display"], "search_start": 5}}))
    monkeypatch.setattr("components.data.load_split", lambda *a, **k: make_digits(400, seed=3))
    code = _tune_cli(tmp_path / "artifacts")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_USAGE and len(err) == 1, err
    assert f"{study / 'keras_tuner'} is corrupt (keras-tuner cannot reload it: TypeError" in err[0]
    assert "run again with --overwrite" in err[0]


def test_a_trial_under_way_when_the_budget_ends_finishes_first(tmp_path, train_split, monkeypatch):
    """The budget runs out during trial 0: it completes and counts; no trial starts after."""
    real = tuner._StudyMixin.on_trial_begin

    def budget_ends_now(self, trial):
        real(self, trial)
        self.deadline = time.monotonic()

    monkeypatch.setattr(tuner._StudyMixin, "on_trial_begin", budget_ends_now)
    lines = []
    result = tuner.tune(_config(max_trials=3), train_split, tmp_path / "b", out=lines.append)
    assert len(result.trials_run) == 1
    assert any(re.match(r"trial 0 completed: val_loss \d", line) for line in lines), lines
    best = json.loads((tmp_path / "b" / tuner.BEST_FILE).read_text())
    assert len(best["trials"]) == 1 and best["score"] == best["trials"][0]["score"]


def test_an_interrupted_search_goes_on_from_its_completed_trials(
    tmp_path, train_split, monkeypatch
):
    """Ctrl-C during trial 1 (trial 0 completed): the same call again keeps trial 0, does not
    run it again, and completes the study."""
    real = tuner._StudyMixin.on_trial_begin

    def ctrl_c_in_the_second(self, trial):
        real(self, trial)
        if len(self.trials_run) == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(tuner._StudyMixin, "on_trial_begin", ctrl_c_in_the_second)
        with pytest.raises(KeyboardInterrupt):
            tuner.tune(_config(max_trials=2), train_split, tmp_path / "i", out=lambda _: None)
    lines = []
    again = tuner.tune(_config(max_trials=2), train_split, tmp_path / "i", out=lines.append)
    assert any(re.search(r"resuming study \S+: 1 trial\(s\)", line) for line in lines), lines
    assert len(again.trials_run) == 1 and "0" not in again.trials_run
    best = json.loads((tmp_path / "i" / tuner.BEST_FILE).read_text())
    assert len([t for t in best["trials"] if t["score"] is not None]) == 2, best["trials"]
