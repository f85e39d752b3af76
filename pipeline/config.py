"""The one typed config of a training run: documented defaults, validation, JSON round-trip."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

DEVICES = ("auto", "cpu", "gpu")


class ConfigError(ValueError):
    """A config value a user gave is invalid (a usage error: exit code 2)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a run does. Defaults are the documented model."""

    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 1e-3
    hidden_units: int = 128
    dropout: float = 0.0
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False
    # Keras runs this many train steps per host round-trip; 1 is plain Keras. Does not change
    # the maths (same batches, same updates), only how often Python is re-entered.
    steps_per_execution: int = 100
    jit_compile: bool = True
    mixed_precision: bool = False
    # Fraction of the training split held out (with the seed) for the validation curves, the
    # per-epoch images and the uncertainty calibration; the tuner holds out the same split.
    # 0 trains on all 60,000 examples (the seed script's recipe) with no validation curves.
    validation_fraction: float = 0.05
    # TensorBoard batch-level scalars every N optimizer steps.
    tensorboard_update_freq: int = 100
    # Publish gate (TFX Evaluator semantics).
    min_accuracy: float = 0.97
    max_regression: float = 0.002
    keep_versions: int = 0  # 0 keeps every version
    # Limits for tests and smoke runs; None means the whole split.
    max_train_examples: int | None = None
    max_test_examples: int | None = None

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def small_config(**overrides: Any) -> TrainConfig:
    """The "run locally" preset for tests and smoke runs: one epoch on a few hundred examples."""
    values: dict[str, Any] = dict(
        epochs=1, batch_size=16, max_train_examples=256, max_test_examples=128,
        steps_per_execution=1, jit_compile=False, min_accuracy=0.0, max_regression=1.0,
        tensorboard_update_freq=4,
    )
    values.update(overrides)
    return TrainConfig(**values)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def validate(config: TrainConfig) -> None:
    """Raise ConfigError naming the first invalid field."""
    for name in ("epochs", "batch_size", "hidden_units", "steps_per_execution",
                 "tensorboard_update_freq"):
        _positive_int(name, getattr(config, name))
    for name in ("max_train_examples", "max_test_examples"):
        if getattr(config, name) is not None:
            _positive_int(name, getattr(config, name))
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {config.seed!r}")
    lr = config.learning_rate
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"learning_rate must be a finite number > 0, got {lr!r}")
    if not 0.0 <= config.dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {config.dropout!r}")
    if not 0.0 <= config.validation_fraction < 1.0:
        raise ConfigError(
            f"validation_fraction must be in [0, 1), got {config.validation_fraction!r}")
    if config.device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {config.device!r}")
    if not 0.0 <= config.min_accuracy <= 1.0:
        raise ConfigError(f"min_accuracy must be in [0, 1], got {config.min_accuracy!r}")
    if not 0.0 <= config.max_regression <= 1.0:
        raise ConfigError(f"max_regression must be in [0, 1], got {config.max_regression!r}")
    if isinstance(config.keep_versions, bool) or not isinstance(config.keep_versions, int) \
            or config.keep_versions < 0:
        raise ConfigError(f"keep_versions must be an integer >= 0, got {config.keep_versions!r}")
