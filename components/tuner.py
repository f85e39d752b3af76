"""Tuner: keras-tuner search over the dense family, selected on a validation split carved from
the training split (the test split is never loaded), resumable, with a time budget."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt
import tensorflow as tf

from components import data as data_lib
from components import files, trainer
from components.model import build_model
from components.trainer import PassNumber

log = logging.getLogger(__name__)

ALGORITHMS = ("hyperband", "random", "bayesian")
# Selection on validation loss: on a few thousand held-out examples, accuracy moves in steps of
# 1/6000 and ties (two trials tied at the top in our first full search); the loss does not.
OBJECTIVE = "val_loss"
BEST_FILE = "best_hparams.json"


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """A search. `validation_fraction`, `seed` and `steps_per_execution` have no defaults here:
    the CLI passes the training config's (pipeline/config.py), so trials and runs hold out the
    same split and run their steps alike."""

    validation_fraction: float
    seed: int
    steps_per_execution: int
    study: str = "default"
    algorithm: str = "hyperband"
    max_trials: int = 40  # an upper bound; the time budget usually ends the search first
    max_epochs: int = 20
    time_budget_minutes: float = 13.0
    overwrite: bool = False
    early_stopping_patience: int = 3


# The searched settings, named as the training config's fields (pipeline/config.py), so that a
# search result is a config override (`train --hparams best_hparams.json`): name -> (keras-tuner
# HyperParameters method, its arguments). `build` defines them from here, `write_best` writes
# them with the config field's type, `format_trials` shows a column each; the model takes the
# ones that are `build_model` arguments, the input pipeline `batch_size`.
SEARCH_SPACE: dict[str, tuple[str, dict[str, Any]]] = {
    "hidden_units": ("Int", dict(min_value=64, max_value=1024, step=64)),
    "dropout": ("Float", dict(min_value=0.0, max_value=0.5, step=0.1)),
    "learning_rate": ("Float", dict(min_value=1e-4, max_value=1e-2, sampling="log")),
    "batch_size": ("Choice", dict(values=[32, 64, 128, 256])),
}
# Searched settings that are not model arguments (the input pipeline's).
NOT_MODEL_ARGUMENTS = ("batch_size",)


def search_type(name: str) -> type:
    """The Python type of a SEARCH_SPACE setting's values (the config field's: a test checks)."""
    method, arguments = SEARCH_SPACE[name]
    return {"Int": int, "Float": float}.get(method) or type(arguments["values"][0])


def searched_values(values: dict[str, Any]) -> dict[str, Any]:
    """A trial's SEARCH_SPACE values with the training config's types (int, float)."""
    out = {}
    for name, (_, arguments) in SEARCH_SPACE.items():
        value = search_type(name)(values[name])
        # a stepped float is a sum of steps (0.30000000000000004): its intended value
        out[name] = round(value, 10) if isinstance(value, float) and "step" in arguments else value
    return out


class DenseHyperModel(kt.HyperModel):
    """Flatten -> Dense(units, relu) -> optional Dropout -> Dense(10, softmax); the batch size
    is searched too, so `fit` builds the input pipeline for each trial."""

    def __init__(self, train: data_lib.Split, validation: data_lib.Split, config: TuneConfig):
        super().__init__(name="mnist_dense")
        self.train, self.validation, self.config = train, validation, config

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        values = {
            name: getattr(hp, method)(name, **arguments)
            for name, (method, arguments) in SEARCH_SPACE.items()
        }
        return build_model(
            **{k: v for k, v in values.items() if k not in NOT_MODEL_ARGUMENTS},
            steps_per_execution=self.config.steps_per_execution,
            jit_compile=True,
        )

    def fit(
        self,
        hp: kt.HyperParameters,
        model: keras.Model,
        *args: Any,
        epochs: int = 1,
        initial_epoch: int = 0,
        callbacks: list | None = None,
        **kwargs: Any,
    ):
        batch_size = hp.get("batch_size")
        # Each epoch is one pass, shuffled by (seed, epoch), as in `pipeline train`.
        pass_number = tf.Variable(initial_epoch, dtype=tf.int64, trainable=False)
        # The trainer's steps in the graph (components/trainer.py): same maths, fewer round-trips.
        per_element = trainer.use_steps_in_graph(model, tf.distribute.get_strategy(), batch_size)
        train_ds = data_lib.make_train_dataset(
            self.train,
            batch_size,
            seed=self.config.seed,
            epoch=pass_number,
            steps_per_element=per_element,
        )
        val_ds = data_lib.make_dataset(self.validation, 2048)
        stop = keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=self.config.early_stopping_patience
        )
        return model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=epochs,
            initial_epoch=initial_epoch,
            callbacks=[PassNumber(pass_number), *(callbacks or []), stop],
            verbose=0,
            shuffle=False,
        )


class _OutOfBudget(Exception):
    pass


class NoTrialCompleted(RuntimeError):
    """The budget ended before any trial completed."""


class NoValidationSplit(ValueError):
    """The validation fraction leaves no example to select on (or none to train on)."""


class DamagedStudy(ValueError):
    """A study's state file parses but is not the state keras-tuner reads back (edited by hand,
    written by another version): keras-tuner itself fails on it with a bare KeyError or
    TypeError deep in its code. `path` is that file, or the study's keras-tuner folder when
    which file is not known."""

    def __init__(self, path: Path, reason: str):
        super().__init__(reason)
        self.path = path


# What keras-tuner raises on state of the wrong shape while it reloads a study; its Oracle turns
# a KeyError into a RuntimeError. Only caught around that reload (`_StudyMixin.reload`).
_RELOAD_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError)


def _environment_errors() -> tuple[type[BaseException], ...]:
    """What the disk, not a trial's hyperparameters, causes: Python's OSError and TensorFlow's
    file errors (a full disk, a file that cannot be read). Retrying the next trial cannot help.
    Running out of memory is not one: a large trial fails, a smaller one may fit."""
    return (
        OSError,
        tf.errors.ResourceExhaustedError,
        tf.errors.DataLossError,
        tf.errors.PermissionDeniedError,
        tf.errors.NotFoundError,
    )


def _fatal_on_environment(call: Any) -> Any:
    """`call`, with an environment error raised as keras-tuner's FatalError (its documented way
    to stop a search: any other error marks the trial failed, prints its traceback and goes
    on to the next trial). `tune` unwraps it again for the CLI's exit codes."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except _environment_errors() as e:
            if isinstance(e, tf.errors.ResourceExhaustedError) and "OOM" in (e.message or ""):
                raise  # out of memory in this trial (TensorFlow's same error class)
            raise kt.errors.FatalError(str(e)) from e

    return wrapped


class _StudyMixin:
    """Progress a person can follow, and clean stops between trials (time or trial budget)."""

    def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> Any:
        return _fatal_on_environment(super().run_trial)(trial, *args, **kwargs)  # type: ignore[misc]

    def reload(self) -> None:
        """keras-tuner's reload of a study that goes on, with its state files checked first
        (naming the file and the key), and anything else it raises on their content as a
        DamagedStudy naming the folder. A truncated file stays a JSONDecodeError: the CLI finds
        and names it (`unreadable_state_file`); a disk error stays what it is."""
        project = Path(self.project_dir)  # type: ignore[attr-defined]
        check_state_files(project, self.oracle)
        try:
            super().reload()  # type: ignore[misc]
        except json.JSONDecodeError:
            raise
        except _RELOAD_ERRORS as e:
            raise DamagedStudy(
                project, f"keras-tuner cannot reload it: {type(e).__name__}: {e}"
            ) from e

    def _setup_study(self, config: TuneConfig, out: Any) -> None:
        self.study_config = config
        self.out = out
        self.started = time.monotonic()
        self.deadline = self.started + config.time_budget_minutes * 60
        self.trials_run: list[str] = []
        self.stop_reason = "the algorithm finished its schedule"

    oracle: Any  # the keras-tuner Tuner's, which this mixin is combined with

    def _completed(self) -> int:
        return sum(
            1
            for t in self.oracle.trials.values()
            if t.status == kt.engine.trial.TrialStatus.COMPLETED
        )

    def pre_create_trial(self) -> None:
        if time.monotonic() >= self.deadline:
            self.stop_reason = f"time budget of {self.study_config.time_budget_minutes:g} min used"
            raise _OutOfBudget
        if self._completed() >= self.study_config.max_trials:
            self.stop_reason = f"--max-trials {self.study_config.max_trials} reached"
            raise _OutOfBudget
        super().pre_create_trial()  # type: ignore[misc]

    def on_trial_begin(self, trial: kt.engine.trial.Trial) -> None:
        super().on_trial_begin(trial)  # type: ignore[misc]
        self.trials_run.append(trial.trial_id)
        values = {
            k: v for k, v in trial.hyperparameters.values.items() if not k.startswith("tuner/")
        }
        epochs = trial.hyperparameters.values.get("tuner/epochs", self.study_config.max_epochs)
        self.out(
            f"trial {trial.trial_id} (#{len(self.oracle.trials)}): {_fmt(values)}, "
            f"up to {epochs} epochs"
        )

    def on_trial_end(self, trial: kt.engine.trial.Trial) -> None:
        super().on_trial_end(trial)  # type: ignore[misc]
        best = self.oracle.get_best_trials(1)
        best_score = best[0].score if best else float("nan")
        left = math.ceil(max(0.0, self.deadline - time.monotonic()))  # "0 s" only when spent
        score = trial.score if trial.score is not None else float("nan")
        accuracy = _best_accuracy(trial)
        self.out(
            f"trial {trial.trial_id} {trial.status.lower()}: {OBJECTIVE} {score:.4f} "
            f"(val_accuracy {accuracy:.4f}), best so far {best_score:.4f}; "
            f"{time.monotonic() - self.started:.0f} s "
            f"elapsed, {left} s of budget left"
        )


def _best_accuracy(trial: Any) -> float:
    """val_accuracy at the epoch the objective was best."""
    try:
        history = trial.metrics.get_history("val_accuracy")
        at = {o.step: o.mean() for o in history}
        return float(at.get(trial.best_step, max(at.values())))
    except (KeyError, ValueError, TypeError, AttributeError):
        return float("nan")


def _fmt(values: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.2e}"
        if isinstance(v, float) and k == "learning_rate"
        else f"{k}={v:g}"
        if isinstance(v, float)
        else f"{k}={v}"
        for k, v in sorted(values.items())
    )


def _tuner_class(algorithm: str) -> type:
    base = {
        "hyperband": kt.Hyperband,
        "random": kt.RandomSearch,
        "bayesian": kt.BayesianOptimization,
    }[algorithm]
    return type(f"Study{base.__name__}", (_StudyMixin, base), {})


@dataclasses.dataclass(frozen=True)
class TuneResult:
    study_dir: Path
    best: dict[str, Any]
    trials_run: list[str]
    stop_reason: str


def tune(
    config: TuneConfig, train: data_lib.Split, study_dir: Path, out: Any = print
) -> TuneResult:
    """Search, then write `best_hparams.json` in `study_dir`. `train` is the training split only:
    the validation split is carved from it here, with `config.seed`."""
    study_dir = Path(study_dir)
    if config.overwrite and study_dir.exists():
        out(f"*** --overwrite: deleting study {config.study} ({study_dir}) and starting over ***")
        shutil.rmtree(study_dir)
    fit_split, val_split = _carve(train, config)
    tuner = _make_tuner(DenseHyperModel(fit_split, val_split, config), config, study_dir, out)
    done = tuner._completed()
    if done:
        out(
            f"*** resuming study {config.study}: {done} trial(s) already done in {study_dir} "
            f"are kept, not re-run (--overwrite starts over) ***"
        )
    out(
        f"searching: {config.algorithm}, selection on {len(val_split)} validation examples "
        f"held out of {len(train)} training examples (seed {config.seed}); the test split is "
        f"not used"
    )
    tensorboard = keras.callbacks.TensorBoard(str(study_dir / "tensorboard"), update_freq="epoch")
    try:
        tuner.search(epochs=config.max_epochs, callbacks=[tensorboard], verbose=0)
    except _OutOfBudget:
        pass
    except kt.errors.FatalError as e:
        if isinstance(e.__cause__, _environment_errors()):
            raise e.__cause__ from None  # the disk: the CLI says which file, exit 6
        raise
    if tuner.stop_reason == "the algorithm finished its schedule":
        tuner.stop_reason = _why_the_schedule_ended(tuner, config)
    out(f"search stopped: {tuner.stop_reason}")
    best = write_best(tuner, config, study_dir, len(fit_split), len(val_split))
    return TuneResult(study_dir, best, tuner.trials_run, tuner.stop_reason)


def _carve(train: data_lib.Split, config: TuneConfig) -> tuple[data_lib.Split, data_lib.Split]:
    """(the trials' training examples, the validation examples they are selected on)."""
    if config.validation_fraction <= 0:
        raise NoValidationSplit(
            "a search selects on a validation split held out of train: "
            "--validation-fraction must be > 0 (the default is 0.05)"
        )
    try:
        return data_lib.carve_validation(train, config.validation_fraction, config.seed)
    except data_lib.EmptyHoldOut as e:
        raise NoValidationSplit(f"--validation-fraction {e}; {e.advice}") from None


def _make_tuner(hypermodel: DenseHyperModel, config: TuneConfig, study_dir: Path, out: Any) -> Any:
    """The keras-tuner Tuner of `config.algorithm` with the study's progress and budgets."""
    common: dict[str, Any] = dict(
        hypermodel=hypermodel,
        objective=OBJECTIVE,
        directory=str(study_dir),
        project_name="keras_tuner",
        overwrite=False,
        seed=config.seed,
    )
    # keras-tuner prints "Reloading Tuner from <file>" when a study goes on: `tune` says that
    # itself, with what it means ("resuming study ...: N trial(s) already done").
    with contextlib.redirect_stdout(io.StringIO()) as said:
        if config.algorithm == "hyperband":
            tuner = _tuner_class("hyperband")(max_epochs=config.max_epochs, factor=3, **common)
        else:
            tuner = _tuner_class(config.algorithm)(max_trials=config.max_trials, **common)
    for line in said.getvalue().splitlines():
        if not line.startswith("Reloading Tuner from "):
            out(line)
    tuner._setup_study(config, out)
    # The oracle writes a trial's state file inside the trial's error handling too.
    tuner.oracle.update_trial = _fatal_on_environment(tuner.oracle.update_trial)
    return tuner


def _why_the_schedule_ended(tuner: Any, config: TuneConfig) -> str:
    """Why an algorithm that ended on its own ran fewer trials than asked, in one line."""
    done = tuner._completed()
    if config.algorithm == "hyperband" and done < config.max_trials:
        return (
            f"Hyperband's bracket schedule for --max-epochs {config.max_epochs} (factor 3) "
            f"holds {done} trial(s), fewer than --max-trials {config.max_trials}; raise "
            f"--max-epochs for more, or use --algorithm random|bayesian"
        )
    if done < config.max_trials:
        return (
            f"the {config.algorithm} search ran out of new hyperparameter combinations "
            f"after {done} trial(s)"
        )
    return str(tuner.stop_reason)


def unreadable_state_file(study_dir: Path) -> Path | None:
    """The first of keras-tuner's JSON state files in a study that does not parse (a kill
    while it was written, a disk that filled), or None."""
    for path in sorted(Path(study_dir).rglob("*.json")):
        if path.name.startswith("."):
            continue  # a temporary copy a kill left behind (files.atomic_write), not state
        try:
            json.loads(path.read_text())
        except (OSError, ValueError):
            return path
    return None


# What keras-tuner's Trial.set_state reads from a trial.json: key -> the JSON it must hold (a
# dict: an object with those keys; a type or types: isinstance; object: anything).
_NUMBER = (int, float)
TRIAL_STATE: dict[str, Any] = {
    "trial_id": str,
    "hyperparameters": {"space": list, "values": dict},
    "metrics": {"metrics": dict},
    "score": (*_NUMBER, type(None)),  # compared and formatted as a number when not null
    "best_step": (*_NUMBER, type(None)),  # null for a trial whose every val_loss was NaN
    "status": str,
    "message": object,
}


def check_state_files(project: Path, oracle: Any) -> None:
    """Raise DamagedStudy naming the first of a study's trial.json and oracle.json files that
    parses but lacks a key keras-tuner reads back, or holds it with the wrong type, before
    keras-tuner reads it: its own error names neither the file nor the key."""
    trial_ids = {_checked_trial(path) for path in sorted(project.glob("trial_*/trial.json"))}
    path = project / "oracle.json"
    if not path.exists():
        return  # keras-tuner's own error says so
    # The keys this oracle's set_state reads are those its get_state writes (values: containers).
    state = _checked(path, json.loads(path.read_text()), _containers(oracle.get_state()))
    for trial_id in state["ongoing_trials"].values():
        if not isinstance(trial_id, str) or trial_id not in trial_ids:
            raise DamagedStudy(path, f"ongoing trial {trial_id!r} has no trial.json")


def _checked_trial(path: Path) -> str:
    """The id of the trial in `path`, once keras-tuner can read it back."""
    state = _checked(path, json.loads(path.read_text()), TRIAL_STATE)
    try:  # what the shape does not reach: each hyperparameter's and metric's own config
        kt.engine.trial.Trial.from_state(state)
    except _RELOAD_ERRORS as e:
        raise DamagedStudy(path, f"not a keras-tuner trial: {type(e).__name__}: {e}") from e
    return str(state["trial_id"])


def _containers(value: Any) -> Any:
    """A state's shape as `_checked` takes it: objects and lists, not their scalars (a fresh
    oracle's None is a saved study's number)."""
    if isinstance(value, dict):
        return {key: _containers(inner) for key, inner in value.items()}
    return list if isinstance(value, list) else object


def _checked(path: Path, state: Any, shape: Any, where: str = "") -> Any:
    """`state`, if it has `shape` (see TRIAL_STATE); DamagedStudy naming the key if not."""
    expected = dict if isinstance(shape, dict) else shape
    if not isinstance(state, expected):
        held = f"{where!r} is {_kind(state)}" if where else f"holds {_kind(state)}"
        wanted = _kind(shape) if isinstance(shape, dict) else " or ".join(_kinds(shape))
        raise DamagedStudy(path, f"{held} where keras-tuner writes {wanted}")
    for key, inner in shape.items() if isinstance(shape, dict) else ():
        name = f"{where}.{key}" if where else key
        if key not in state:
            raise DamagedStudy(path, f"no key {name!r}, which keras-tuner reads back")
        _checked(path, state[key], inner, name)
    return state


def _kind(value: Any) -> str:
    """A JSON value's kind, as a person reads it."""
    return _kinds(type(value))[0]


def _kinds(types: type | tuple[type, ...]) -> list[str]:
    """JSON kinds of Python types, as a person reads them, each once (int and float: a number)."""
    names = {dict: "an object", list: "a list", str: "a string", int: "a number"}
    names |= {float: "a number", bool: "a boolean", type(None): "null"}
    out: list[str] = []
    for t in types if isinstance(types, tuple) else (types,):
        name = names.get(t, t.__name__)
        out += [name] if name not in out else []
    return out


def best_epoch(trial: Any) -> int | None:
    """Epochs a trial's model had trained when it reached its best score. keras-tuner counts
    `best_step` from the start of the trial's own `fit`, and a Hyperband trial that continues an
    earlier one starts at `tuner/initial_epoch`: both are added."""
    if trial.score is None or trial.best_step is None:  # (None: every val_loss was NaN)
        return None
    return int(trial.hyperparameters.values.get("tuner/initial_epoch", 0)) + trial.best_step + 1


def write_best(
    tuner: Any, config: TuneConfig, study_dir: Path, n_fit: int, n_val: int
) -> dict[str, Any]:
    trials = sorted(tuner.oracle.trials.values(), key=lambda t: t.trial_id)
    table = [
        {
            "trial_id": t.trial_id,
            "status": t.status,
            "values": {
                k: v for k, v in t.hyperparameters.values.items() if not k.startswith("tuner/")
            },
            "epochs": t.hyperparameters.values.get("tuner/epochs", config.max_epochs),
            "score": t.score,
            "val_accuracy": _best_accuracy(t) if t.score is not None else None,
            "best_epoch": best_epoch(t),
        }
        for t in trials
    ]
    completed = tuner.oracle.get_best_trials(1)
    if not completed:
        raise NoTrialCompleted(
            "no trial completed within the budget: raise --time-budget or --max-trials"
        )
    best = completed[0]
    values = {k: v for k, v in best.hyperparameters.values.items() if not k.startswith("tuner/")}
    result = {
        "study": config.study,
        "algorithm": config.algorithm,
        "objective": OBJECTIVE,
        "score": best.score,
        "val_accuracy": _best_accuracy(best),
        "trial_id": best.trial_id,
        "validation": {
            "fraction": config.validation_fraction,
            "seed": config.seed,
            "train_examples": n_fit,
            "validation_examples": n_val,
        },
        # What `pipeline train --hparams` reads: the winning values, and as many epochs as the
        # winning trial needed to reach its best validation score.
        "hparams": {**searched_values(values), "epochs": best_epoch(best)},
        "trials": table,
    }
    files.write_text(Path(study_dir) / BEST_FILE, json.dumps(result, indent=2) + "\n")
    return result


def format_trials(best: dict[str, Any]) -> str:
    """The trials as a Markdown table, best first: one column per SEARCH_SPACE setting."""
    columns = ["trial", *SEARCH_SPACE, "epochs", "best epoch", OBJECTIVE, "val_accuracy"]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for t in sorted(
        best["trials"], key=lambda t: t["score"] if t["score"] is not None else float("inf")
    ):
        score = f"{t['score']:.4f}" if t["score"] is not None else t["status"].lower()
        accuracy = f"{t['val_accuracy']:.4f}" if t.get("val_accuracy") is not None else ""
        mark = " (best)" if t["trial_id"] == best["trial_id"] else ""
        cells = [
            f"{t['trial_id']}{mark}",
            *(_fmt_value(name, t["values"].get(name)) for name in SEARCH_SPACE),
            str(t["epochs"]),
            str(t["best_epoch"]),
            score,
            accuracy,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt_value(name: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2e}" if name == "learning_rate" else f"{value:g}"
    return str(value)
