"""The typed config: documented defaults, validation, JSON round-trip, CLI resolution."""

import argparse
import json
from pathlib import Path

import pytest

from pipeline.cli import build_parser, resolve_config
from pipeline.config import ConfigError, TrainConfig, small_config


def test_documented_defaults():
    c = TrainConfig()
    assert (c.epochs, c.batch_size, c.learning_rate, c.hidden_units, c.seed) == (
        5,
        32,
        1e-3,
        128,
        0,
    )
    assert c.device == "auto" and c.dropout == 0.0
    # the README's other defaults
    assert (c.min_accuracy, c.max_regression, c.validation_fraction) == (0.97, 0.002, 0.05)
    assert (c.steps_per_execution, c.jit_compile, c.tensorboard_update_freq) == (100, True, 100)
    assert c.cpu_threads == 0  # auto: one thread for one replica on the CPU


def test_json_round_trip(tmp_path):
    c = small_config(epochs=3, learning_rate=0.01, device="cpu")
    c.to_json(tmp_path / "config.json")
    assert TrainConfig.from_json(tmp_path / "config.json") == c
    assert json.loads((tmp_path / "config.json").read_text())["requested"]["epochs"] == 3


@pytest.mark.parametrize(
    "field,value",
    [
        ("epochs", 0),
        ("epochs", -1),
        ("batch_size", 0),
        ("learning_rate", 0.0),
        ("learning_rate", -1e-3),
        ("learning_rate", float("nan")),
        ("seed", 1.5),
        ("seed", -1),
        ("hidden_units", 0),
        ("device", "tpu"),
        ("dropout", 1.0),
        ("min_accuracy", 1.5),
        # wrong types from a JSON file: never coerced
        ("dropout", "0.1"),
        ("validation_fraction", None),
        ("jit_compile", "no"),
        ("mixed_precision", "false"),
        ("mixed_precision", False),
        ("epochs", 2.0),
        ("epochs", True),
        ("seed", 2**32),
        ("learning_rate", float("inf")),
        ("deterministic", 1),
    ],
)
def test_invalid_values_are_refused_with_the_field_named(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_unknown_keys_are_refused():
    with pytest.raises(ConfigError, match="unknown config keys: colour"):
        TrainConfig.from_dict({"colour": "red"})


def test_flags_override_hparams_file_which_overrides_defaults(tmp_path):
    hp = tmp_path / "best_hparams.json"
    hp.write_text(json.dumps({"hparams": {"hidden_units": 256, "learning_rate": 0.002}}))
    args = build_parser().parse_args(["train", "--hparams", str(hp), "--learning-rate", "0.005"])
    c = resolve_config(args)
    assert (c.hidden_units, c.learning_rate, c.epochs) == (256, 0.005, 5)


def test_only_given_flags_reach_the_config():
    c = resolve_config(build_parser().parse_args(["train", "--epochs", "2"]))
    assert c == TrainConfig(epochs=2)


def test_a_new_setting_gets_its_flag_type_check_and_hparams_entry(tmp_path):
    """Adding a hyperparameter takes its declaration (and its use): the flag, the --hparams
    type check and the HParams key come from the declaration."""
    import dataclasses

    from pipeline.cli import add_config_flags
    from pipeline.config import hparam_keys, setting

    Extended = dataclasses.make_dataclass(
        "Extended",
        [
            (
                "label_smoothing",
                float,
                setting(0.0, "label smoothing", minimum=0, below=1, hparam=True),
            )
        ],
        bases=(TrainConfig,),
        frozen=True,
    )
    assert "label_smoothing" in hparam_keys(Extended)
    parser = argparse.ArgumentParser()
    add_config_flags(parser, Extended)
    parser.add_argument("--hparams", type=Path)
    args = parser.parse_args(["--label-smoothing", "0.1"])
    assert resolve_config(args, Extended).label_smoothing == 0.1
    with pytest.raises(SystemExit):
        parser.parse_args(["--label-smoothing", "1.5"])
    (tmp_path / "hp.json").write_text(json.dumps({"label_smoothing": "0.1"}))
    with pytest.raises(ConfigError, match="label_smoothing must be a number in \\[0, 1\\)"):
        resolve_config(parser.parse_args(["--hparams", str(tmp_path / "hp.json")]), Extended)


def test_every_field_has_a_flag_and_the_tuner_searches_config_fields():
    from components.tuner import SEARCH_SPACE
    from pipeline.config import fields, hparam_keys

    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for field in fields():
        assert field.flag in help_text, field.flag
    assert set(SEARCH_SPACE) <= set(hparam_keys())


def test_the_search_space_is_what_trials_use_and_best_hparams_writes():
    """SEARCH_SPACE is the one list: a trial's model and best_hparams.json follow it, with the
    config fields' types (a searched setting added there alone reaches `train --hparams`)."""
    import keras_tuner as kt

    from components import tuner
    from pipeline.config import fields

    types = {f.name: f.type for f in fields()}
    assert {name: tuner.search_type(name) for name in tuner.SEARCH_SPACE} == {
        name: types[name] for name in tuner.SEARCH_SPACE
    }
    hp = kt.HyperParameters()
    model = tuner.DenseHyperModel(None, None, _tune_config()).build(hp)
    assert set(hp.values) == set(tuner.SEARCH_SPACE)
    assert model.layers[1].units == hp.values["hidden_units"]
    written = tuner.searched_values(hp.values)
    assert list(written) == list(tuner.SEARCH_SPACE)
    TrainConfig(**written)  # every value is a valid training setting of the right type
    assert all(type(v) is types[k] for k, v in written.items())


def _tune_config():
    from components import tuner

    defaults = TrainConfig()
    return tuner.TuneConfig(
        validation_fraction=defaults.validation_fraction,
        seed=defaults.seed,
        steps_per_execution=defaults.steps_per_execution,
    )


def test_bad_flag_and_bad_config_value_say_the_same_range():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--validation-fraction", "1"])
    with pytest.raises(ConfigError, match=r"validation_fraction must be a number in \[0, 1\)"):
        TrainConfig(validation_fraction=1.0)


def test_no_function_in_the_product_is_over_60_lines():
    """Issue 13's bound on the shape of the code: a function grown past it is split into named
    steps (pipeline, components, serving, benchmarks; tests are not bound)."""
    import ast

    from tests.helpers import ROOT

    long = []
    for folder in ("pipeline", "components", "serving", "benchmarks"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 60:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert not long, long
