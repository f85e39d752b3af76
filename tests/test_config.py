"""The typed config: documented defaults, validation, JSON round-trip, CLI resolution."""

import json

import pytest

from pipeline.cli import build_parser, resolve_config
from pipeline.config import ConfigError, TrainConfig, small_config


def test_documented_defaults():
    c = TrainConfig()
    assert (c.epochs, c.batch_size, c.learning_rate, c.hidden_units, c.seed) == (5, 32, 1e-3,
                                                                                 128, 0)
    assert c.device == "auto" and c.dropout == 0.0


def test_json_round_trip(tmp_path):
    c = small_config(epochs=3, learning_rate=0.01, device="cpu")
    c.to_json(tmp_path / "config.json")
    assert TrainConfig.from_json(tmp_path / "config.json") == c
    assert json.loads((tmp_path / "config.json").read_text())["epochs"] == 3


@pytest.mark.parametrize("field,value", [
    ("epochs", 0), ("epochs", -1), ("batch_size", 0), ("learning_rate", 0.0),
    ("learning_rate", -1e-3), ("learning_rate", float("nan")), ("seed", 1.5), ("seed", -1),
    ("hidden_units", 0), ("device", "tpu"), ("dropout", 1.0), ("min_accuracy", 1.5),
])
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
