"""The one typed config of a training run: every setting declared once, with its type, default,
range and help. The CLI flags, `--hparams` type checks, TensorBoard's HParams keys and the tuner's
search-space names are derived from these declarations (see docs/CONTRACT.md, "Adding a setting").
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config value a user gave is invalid (a usage error: exit code 2)."""


def setting(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    below: float | None = None,
    choices: tuple[str, ...] | None = None,
    hparam: bool = False,
    group: str = "training",
) -> Any:
    """Declare a config field: `minimum`/`maximum` inclusive, `below` exclusive; `hparam` marks
    the fields logged in TensorBoard's HParams tab and searchable by the tuner."""
    return dataclasses.field(
        default=default,
        metadata=dict(
            help=help,
            minimum=minimum,
            maximum=maximum,
            below=below,
            choices=choices,
            hparam=hparam,
            group=group,
        ),
    )


SEED_LIMIT = 2**32  # numpy's and TensorFlow's seeds are 32-bit


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a run does. Defaults are the documented model."""

    epochs: int = setting(
        5, "passes over the training examples", minimum=1, maximum=10_000, hparam=True
    )
    batch_size: int = setting(
        32, "global batch size (split over replicas)", minimum=1, maximum=65_536, hparam=True
    )
    learning_rate: float = setting(1e-3, "Adam learning rate", minimum=0, hparam=True)
    # 65,536 units: 784 x 65,536 weights (+ Adam's two slots) is ~0.6 GB; more is a typo.
    hidden_units: int = setting(
        128, "units of the hidden Dense layer", minimum=1, maximum=65_536, hparam=True
    )
    dropout: float = setting(
        0.0, "dropout after the hidden layer (0: no Dropout layer)", minimum=0, below=1, hparam=True
    )
    seed: int = setting(
        0,
        "random seed (weights, shuffling, the validation split)",
        minimum=0,
        below=SEED_LIMIT,
        hparam=True,
    )
    validation_fraction: float = setting(
        0.05,
        "fraction of the training split held out (with the seed) for validation curves "
        "and calibration; 0 trains on all of it with no validation",
        minimum=0,
        below=1,
        hparam=True,
    )
    device: str = setting(
        "auto",
        "auto: the GPU(s) when TensorFlow sees any, else the CPU",
        choices=("auto", "cpu", "gpu"),
        group="device",
    )
    cpu_devices: int = setting(
        1,
        "split the CPU into N logical devices and mirror over them "
        "(MirroredStrategy without GPUs: tests the multi-device path)",
        minimum=1,
        maximum=64,
        group="device",
    )
    cpu_threads: int = setting(
        0,
        "TensorFlow threads on the CPU, per op and (one replica) ops at once; N > 0 is used "
        "as given; 0 = auto: 1 for one replica on the CPU with batch x hidden units <= 8192 "
        "(the documented model up to batch 64), whose small steps lose more to thread "
        "hand-offs than they gain; else TensorFlow's default (one per core, or the "
        "TF_NUM_INTRAOP_THREADS/TF_NUM_INTEROP_THREADS you set)",
        minimum=0,
        maximum=4096,
        group="device",
    )
    deterministic: bool = setting(
        False, "TensorFlow op determinism: same seed, same weights", group="device"
    )
    # Keras runs this many train steps per host round-trip; 1 is plain Keras. Does not change
    # the maths (same batches, same updates), only how often Python is re-entered.
    steps_per_execution: int = setting(
        100,
        "train steps per host round-trip (1: plain Keras)",
        minimum=1,
        maximum=1_000_000,
        hparam=True,
        group="device",
    )
    jit_compile: bool = setting(
        True,
        "compile the train step with XLA (where the strategy allows it)",
        hparam=True,
        group="device",
    )
    mixed_precision: str = setting(
        "auto",
        "float16 compute with float32 weights: auto = on "
        "for GPUs of compute capability >= 7.0, off on CPUs",
        choices=("auto", "on", "off"),
        group="device",
    )
    tensorboard_update_freq: int = setting(
        100,
        "TensorBoard step scalars every N steps of an epoch and at its end (best a multiple "
        "of steps_per_execution: steps are reported per host round-trip)",
        minimum=1,
        maximum=1_000_000,
        group="monitoring",
    )
    profile_executions: int = setting(
        0,
        "write a TensorBoard profile (Profile tab; `pip install -e '.[profile]'`) of N host "
        "round-trips early in epoch 2 (in epoch 1 for a one-epoch run; 0: none)",
        minimum=0,
        maximum=10_000,
        group="monitoring",
    )
    min_accuracy: float = setting(
        0.97,
        "publish only at or above this test accuracy",
        minimum=0,
        maximum=1,
        group="publish gate",
    )
    max_regression: float = setting(
        0.002,
        "refuse a model this far below the latest version "
        "(when the drop is also significant, McNemar p < 0.05)",
        minimum=0,
        maximum=1,
        group="publish gate",
    )
    keep_versions: int = setting(
        0,
        "after publishing keep the newest K versions (0: all; labelled versions are always kept)",
        minimum=0,
        maximum=1_000_000,
        group="publish gate",
    )
    max_train_examples: int | None = setting(
        None,
        "use only the first N training examples (smoke runs)",
        minimum=1,
        maximum=1_000_000_000,
        group="smoke runs",
    )
    max_test_examples: int | None = setting(
        None,
        "evaluate on the first N test examples only "
        "(smoke runs: never published unless "
        "--publish-partial-test)",
        minimum=1,
        maximum=1_000_000_000,
        group="smoke runs",
    )
    publish_partial_test: bool = setting(
        False,
        "allow publishing a model evaluated on part of the test split (recorded in metrics.json)",
        group="smoke runs",
    )

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: Path, effective: dict[str, Any] | None = None) -> None:
        value: dict[str, Any] = {"requested": self.to_dict()}
        if effective is not None:
            value["effective"] = effective
        from components.files import atomic_write

        with atomic_write(path, "w") as f:  # (a run killed meanwhile leaves none, not half)
            f.write(json.dumps(value, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: Path) -> TrainConfig:
        value = json.loads(Path(path).read_text())
        return cls.from_dict(value.get("requested", value) if isinstance(value, dict) else value)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def small_config(**overrides: Any) -> TrainConfig:
    """The "run locally" preset for tests and smoke runs: one epoch on a few hundred examples."""
    values: dict[str, Any] = dict(
        epochs=1,
        batch_size=16,
        max_train_examples=256,
        max_test_examples=128,
        steps_per_execution=1,
        jit_compile=False,
        min_accuracy=0.0,
        max_regression=1.0,
        tensorboard_update_freq=4,
        publish_partial_test=True,
    )
    values.update(overrides)
    return TrainConfig(**values)


# --------------------------------------------------------------------------------------------
# Field introspection: what the CLI, --hparams, HParams and the tuner derive from.


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    type: type  # int, float, bool or str
    optional: bool
    default: Any
    meta: dict[str, Any]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def describe_range(self, null: bool = True) -> str:
        """What a value must be, for a message; `null`: say that an optional one may be null
        (in JSON; a flag cannot be)."""
        m = self.meta
        if m["choices"]:
            return "one of " + ", ".join(m["choices"])
        kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
        low, high, below = m["minimum"], m["maximum"], m["below"]
        if (
            self.type is float
            and low == 0
            and below is None
            and high is None
            and self.name == "learning_rate"
        ):
            return "a finite number > 0"
        parts = [kind[self.type]]
        # integers written out (2**32 as 4294967296, not 4.29497e+09)
        show = (lambda v: str(int(v))) if self.type is int else (lambda v: f"{v:g}")
        if low is not None or high is not None or below is not None:
            lo = f"[{show(low)}" if low is not None else "(-inf"
            hi = (
                f"{show(high)}]"
                if high is not None
                else (f"{show(below)})" if below is not None else "inf)")
            )
            parts.append(f"in {lo}, {hi}")
        return " ".join(parts) + (" (or null)" if self.optional and null else "")


def fields(cls: type = TrainConfig) -> list[Field]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = type(None) in typing.get_args(hint)
        base = args[0] if optional else hint
        out.append(Field(f.name, base, optional, f.default, dict(f.metadata)))
    return out


def hparam_keys(cls: type = TrainConfig) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.meta.get("hparam"))


def check_value(field: Field, value: Any) -> Any:
    """The value if it has the field's type and range, else ConfigError naming both."""

    def bad() -> ConfigError:
        return ConfigError(f"{field.name} must be {field.describe_range()}, got {value!r}")

    if value is None:
        if field.optional:
            return None
        raise bad()
    if field.type is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if field.type is str:
        if not isinstance(value, str) or (
            field.meta["choices"] and value not in field.meta["choices"]
        ):
            raise bad()
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad()
    if field.type is int and not isinstance(value, int):
        raise bad()
    if not math.isfinite(value):
        raise bad()
    m = field.meta
    if field.name == "learning_rate" and value <= 0:
        raise bad()
    if (
        (m["minimum"] is not None and value < m["minimum"])
        or (m["maximum"] is not None and value > m["maximum"])
        or (m["below"] is not None and value >= m["below"])
    ):
        raise bad()
    return float(value) if field.type is float else value


def validate(config: Any) -> None:
    """Raise ConfigError naming the first field with a wrong type or an out-of-range value."""
    for field in fields(type(config)):
        check_value(field, getattr(config, field.name))
