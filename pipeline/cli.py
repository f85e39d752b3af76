"""Command line: `python -m pipeline train|report ...` parses flags into the config and calls
the pipeline. Errors a user can cause end in one line on stderr and a documented exit code."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from pipeline.config import ConfigError, Field, TrainConfig, check_value, fields

# Exit codes (the README's table).
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_NOT_BLESSED = 3
EXIT_DATA = 4
EXIT_DIVERGED = 5
EXIT_PUBLISH = 6
EXIT_BACKUP = 7
EXIT_INFRA = 8
EXIT_MEMORY = 9
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process the signal ended


class UsageError(Exception):
    """A bad flag or path: exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _int(kind: str, minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}")
        return value

    return parse


NO_VERSION = 0  # `models canary none`


def _version(text: str) -> int:
    """argparse type of a version: a positive integer, or `none` (NO_VERSION)."""
    if text.strip().lower() == "none":
        return NO_VERSION
    return POSITIVE(text)


def _path(text: str) -> Path:
    """argparse type for a path: an empty one would mean the current folder, silently."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(text)


def _number(field: Field):
    """argparse type for a config field: parses the text; range checks are the config's."""

    def parse(text: str) -> Any:
        try:
            value = field.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {field.describe_range(null=False)}, got {text!r}"
            ) from None
        try:
            return check_value(field, value)
        except ConfigError:
            raise argparse.ArgumentTypeError(
                f"expected {field.describe_range(null=False)}, got {text!r}"
            ) from None

    return parse


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type = TrainConfig, *, only: tuple[str, ...] | None = None
) -> None:
    """One flag per config field, grouped, with the field's help, default and range.

    Defaults are SUPPRESSed (only flags given on the command line override `--hparams`), except
    with `only` (a command that takes a few of the fields directly, like `tune`).
    """
    groups: dict[str, Any] = {}
    for field in fields(cls):
        if only is not None and field.name not in only:
            continue
        suppress = argparse.SUPPRESS if only is None else field.default
        group = groups.get(field.meta["group"])
        if group is None:
            group = groups[field.meta["group"]] = parser.add_argument_group(field.meta["group"])
        default = "none" if field.default is None else field.default
        help_text = f"{field.meta['help']} (default {default})"
        if field.type in (int, float) and not field.meta["choices"]:
            help_text = f"{help_text[:-1]}; {field.describe_range(null=False)})"
        if field.type is bool:
            group.add_argument(
                field.flag, action=argparse.BooleanOptionalAction, default=suppress, help=help_text
            )
        elif field.meta["choices"]:
            group.add_argument(
                field.flag, choices=field.meta["choices"], default=suppress, help=help_text
            )
        else:
            group.add_argument(
                field.flag,
                type=_number(field),
                default=suppress,
                metavar=field.name.upper(),
                help=help_text,
            )


def _run_name(text: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", text) or text == "latest":
        raise argparse.ArgumentTypeError(
            f"expected 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit (not 'latest'), got {text[:120]!r}" + ("..." if len(text) > 120 else "")
        )
    return text


POSITIVE = _int("a positive integer", 1)
NON_NEGATIVE = _int("an integer >= 0", 0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser(
        "train", help="ingest -> train -> export -> validate as served -> gate -> publish -> report"
    )
    _add_train_flags(train)
    tune = _add_tune_parser(sub)
    clu = sub.add_parser(
        "cluster",
        help="train with N local worker processes "
        "(MultiWorkerMirroredStrategy, generated TF_CONFIG)",
    )
    _add_cluster_flags(clu)
    mod = sub.add_parser(
        "models", help="published versions: list, and serve by label (promote, canary, rollback)"
    )
    _add_models_flags(mod)
    rep = sub.add_parser("report", help="rebuild the report of an earlier run")
    rep.add_argument("run_dir", type=_path, help="artifacts/runs/<run_id> (or .../latest)")
    for command in (train, tune, clu, rep, mod):
        command.add_argument(
            "--verbose",
            action="store_true",
            help="also show library logs (TensorFlow's native start-up and "
            "XLA lines, TFDS progress) that are hidden by default",
        )
    return parser


def _add_train_flags(train: argparse.ArgumentParser) -> None:
    """`train`: one flag per config field, --hparams, and where the run reads and writes."""
    add_config_flags(train)
    train.add_argument(
        "--hparams",
        type=_path,
        help="JSON of config values, e.g. a tuner's "
        "best_hparams.json or a run's config.json; flags given here override it",
    )
    g = train.add_argument_group("paths")
    _add_artifacts(g)
    g.add_argument(
        "--run-name",
        type=_run_name,
        help="name of the run (default: a fresh time-based id); running again "
        "under the same name resumes it from its last completed epoch",
    )
    g.add_argument(
        "--tfds-data-dir",
        type=_path,
        help="where TFDS keeps prepared data (default: TFDS's own, "
        "$TFDS_DATA_DIR or ~/tensorflow_datasets)",
    )
    g.add_argument(
        "--tfds-manual-dir",
        type=_path,
        default=os.environ.get("MNIST_MANUAL_DIR") or None,
        help="folder with the four official MNIST .gz files, for offline use "
        "(default: $MNIST_MANUAL_DIR)",
    )


def _add_cluster_flags(clu: argparse.ArgumentParser) -> None:
    """`cluster`: how many workers, how many restarts, and the flags passed on to `train`."""
    clu.add_argument("--workers", type=POSITIVE, default=2, help="worker processes (default 2)")
    clu.add_argument(
        "--max-restarts",
        type=NON_NEGATIVE,
        default=2,
        help="restarts of the whole cluster when a worker is killed (default 2)",
    )
    clu.add_argument(
        "train_args",
        nargs=argparse.REMAINDER,
        help="after `--`: flags for `train`, e.g. -- --epochs 1",
    )


def _add_models_flags(mod: argparse.ArgumentParser) -> None:
    """`models`: the action on the published versions, and which version it acts on."""
    mod.add_argument("action", choices=("list", "promote", "canary", "rollback"))
    mod.add_argument(
        "version",
        nargs="?",
        type=_version,
        help="the version to promote to stable or serve as canary (`canary none`: no canary)",
    )
    mod.add_argument(
        "--base-path",
        default=None,
        help="the models folder as TF Serving sees it, written into the "
        "generated models.config (default: its absolute path here; "
        "/models/mnist inside the tensorflow/serving container)",
    )
    mod.add_argument("--json", action="store_true", help="list as JSON")
    _add_artifacts(mod)


def _add_tune_parser(sub: Any) -> argparse.ArgumentParser:
    tune = sub.add_parser(
        "tune",
        help="keras-tuner search over the dense family; writes "
        "artifacts/tuning/<study>/best_hparams.json",
    )
    tune.add_argument(
        "--study",
        type=_run_name,
        default="default",
        help="study name: re-running a study continues it (default 'default')",
    )
    tune.add_argument(
        "--algorithm",
        choices=("hyperband", "random", "bayesian"),
        default="hyperband",
        help="search algorithm (default hyperband)",
    )
    tune.add_argument(
        "--max-trials",
        type=POSITIVE,
        default=40,
        help="stop after this many completed trials (default 40)",
    )
    tune.add_argument(
        "--max-epochs",
        type=POSITIVE,
        default=20,
        help="epochs for the longest trial (default 20); early stopping on "
        "validation loss inside trials",
    )
    tune.add_argument(
        "--time-budget",
        type=_number(
            Field(
                "time_budget",
                float,
                False,
                13.0,
                {"minimum": 0.01, "maximum": None, "below": None, "choices": None},
            )
        ),
        default=13.0,
        help="minutes; the search stops cleanly between trials when it is spent (default 13)",
    )
    # The validation split is the training runs' own (same field, same default, same seed), so
    # runs and trials compare in the HParams tab.
    add_config_flags(tune, only=("validation_fraction", "seed", "max_train_examples", "device"))
    tune.add_argument(
        "--overwrite", action="store_true", help="delete the study's trials and start over"
    )
    _add_artifacts(tune)
    tune.add_argument("--tfds-data-dir", type=_path)
    tune.add_argument(
        "--tfds-manual-dir", type=_path, default=os.environ.get("MNIST_MANUAL_DIR") or None
    )
    return tune


def _add_artifacts(group: Any) -> None:
    group.add_argument(
        "--artifacts-dir",
        type=_path,
        default=Path(os.environ.get("ARTIFACTS_DIR") or "artifacts"),
        help="where runs, TensorBoard logs and models go (default: $ARTIFACTS_DIR or ./artifacts)",
    )


def resolve_config(args: argparse.Namespace, cls: Any = TrainConfig) -> Any:
    """Documented defaults, then --hparams, then flags given on the command line."""
    names = {f.name for f in fields(cls)}
    values: dict[str, Any] = {}
    if args.hparams is not None:
        values.update(load_hparams(args.hparams))
    values.update({k: v for k, v in vars(args).items() if k in names})
    try:
        return cls.from_dict(values)
    except ConfigError as e:
        source = f" (from --hparams {args.hparams})" if args.hparams is not None else ""
        raise ConfigError(f"{e}{source}") from None


def load_hparams(path: Path) -> dict[str, Any]:
    """Config values from a JSON file: either flat, or a tuner result with a "hparams" key."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"key(s) given twice: {', '.join(twice)}")
        return dict(pairs)

    try:
        value = json.loads(Path(path).read_text(), object_pairs_hook=no_duplicates)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise UsageError(f"--hparams {path}: cannot read JSON ({e})") from None
    for key in ("hparams", "requested"):  # a tuner's best_hparams.json, a run's config.json
        if isinstance(value, dict) and isinstance(value.get(key), dict):
            value = value[key]
    if not isinstance(value, dict):
        raise UsageError(f"--hparams {path}: expected a JSON object")
    return value


def check_artifacts_dir(path: Path) -> None:
    """Refuse an artifacts path that is a file or cannot be written, creating nothing."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--artifacts-dir {path} exists and is not a folder")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--artifacts-dir {path}: {probe} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UsageError(f"--artifacts-dir {path} is not writable ({e.strerror})") from None
    for sub in ("runs", "tensorboard", "models", "tuning"):
        if (path / sub).exists() and not (path / sub).is_dir():
            raise UsageError(
                f"--artifacts-dir {path}: {path / sub} exists and is not a folder "
                f"(move it away; the run writes its {sub} there)"
            )


def _setup_logging(verbose: bool) -> None:
    from components import console

    console.setup(verbose)


def _fail(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a container stopped): unwound as an interrupt, reported as itself."""


def _resume_hint(e: KeyboardInterrupt) -> str:
    """How to go on with the interrupted run (noted by `_train` once the run had begun)."""
    notes = getattr(e, "__notes__", None)
    return f"; {notes[-1]}" if notes else ""


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _cluster_worker() -> bool:
    from components.strategy import DeviceError, parse_tf_config

    try:
        return parse_tf_config(os.environ.get("TF_CONFIG")) is not None
    except DeviceError:  # a garbled TF_CONFIG: refused later, in one line, by `train`
        return False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    # Not in a cluster worker: a worker waiting in a collective would not run a Python handler,
    # and its supervisor stops it with SIGTERM, then SIGKILL; left to SIGTERM's default, it ends
    # at once (every file of a run is written atomically) and a launcher sees the signal (the
    # local `cluster` restarts workers killed by one). A TF_CONFIG of one task is no cluster.
    handle = not _cluster_worker() and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if handle else None
    try:
        return _output_written(args, _command(args))
    finally:
        if handle:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _output_written(args: argparse.Namespace, code: int) -> int:
    """A console that could not be written (`> file` on a full disk) stops no command; at the
    end, one line says so. `models list`'s output is its answer: then exit 6 (writing failed).
    A run's results are its files, and a label's change its two files, written or refused with
    their own code: that code stands."""
    from components import console

    lost = console.output_lost()
    if lost is None:
        return code
    if args.command == "models" and args.action == "list":
        return _fail(code or EXIT_PUBLISH, lost)
    print(f"warning: {lost}; the command's files are as its exit code says", file=sys.stderr)
    return code


def _command(args: argparse.Namespace) -> int:
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "report":
            return _report(args)
        if args.command == "tune":
            return _tune(args)
        if args.command == "cluster":
            return _cluster(args)
        if args.command == "models":
            return _models(args)
    except (UsageError, ConfigError) as e:
        return _fail(EXIT_USAGE, str(e))
    except Terminated as e:
        return _fail(EXIT_TERMINATED, "terminated (SIGTERM)" + _resume_hint(e))
    except KeyboardInterrupt as e:
        return _fail(EXIT_INTERRUPTED, "interrupted" + _resume_hint(e))
    raise AssertionError(args.command)


def _train(args: argparse.Namespace) -> int:
    from components import compile_cache

    compile_cache.prepare()  # before TensorFlow sets up its devices, when it reads its XLA flags
    config = resolve_config(args)
    check_artifacts_dir(args.artifacts_dir)
    from components.strategy import parse_tf_config
    from pipeline.run import Paths, new_run_id, train_pipeline

    paths = Paths(args.artifacts_dir, args.tfds_data_dir, args.tfds_manual_dir)
    run_id = args.run_name or new_run_id()
    try:
        result = train_pipeline(
            config,
            paths,
            run_id=run_id,
            tf_config=parse_tf_config(os.environ.get("TF_CONFIG")),
        )
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: say how to go on, if the run began
        if paths.run_dir(run_id).is_dir():
            again = "" if args.run_name else f" with {run_name_flag(run_id)}"
            e.add_note(f"the same command{again} resumes the run where it stopped")
        raise
    except Exception as e:
        mapped = map_error(e, run_id)
        if mapped is None:
            raise
        return _fail(*mapped)
    if result.metrics.get("chief") is False:
        return EXIT_OK  # a non-chief worker: the chief's exit code is the job's
    if not result.blessed:
        return _fail(EXIT_NOT_BLESSED, f"model not blessed: {result.metrics['gate']['reason']}")
    return EXIT_OK


# What to do after freeing space, for a search (keras-tuner reloads its completed trials).
TUNE_AGAIN = "run the same command again: the study goes on from its completed trials"


def map_error(
    e: BaseException, run_id: str | None = None, again: str | None = None
) -> tuple[int, str] | None:
    """The exit code and one-line message for an error a user, a file or the disk can cause;
    None for a bug (the traceback is then printed, exit 1). `again`: what to do once disk
    space is freed (default: the training run's own --run-name)."""
    from components import files

    if _raised(e, "components.strategy.DeviceError", "pipeline.stages.RunStateError") or (
        isinstance(e, ConfigError)
    ):
        return EXIT_USAGE, str(e)
    if _raised(e, "components.trainer.BackupError"):
        return EXIT_BACKUP, f"resume: {e}"
    if _raised(e, "components.data.DataDiskFull"):
        return EXIT_PUBLISH, f"data: {e}"
    if _raised(e, "components.data.DataError"):
        return EXIT_DATA, f"data: {e}"
    if _raised(e, "components.trainer.TrainingDiverged"):
        return EXIT_DIVERGED, f"training: {e}; nothing was published"
    if _raised(e, "components.infra_validator.BaselineDamaged"):
        again = f" {run_name_flag(run_id)}" if run_id else " the same --run-name"
        return EXIT_INFRA, (
            f"infra validation: {e}; nothing was published (once that folder is dealt with, "
            f"the same command with{again} goes on from where this run stopped)"
        )
    if _raised(e, "components.infra_validator.InfraValidationError"):
        again = f" {run_name_flag(run_id)}" if run_id else ""
        return EXIT_INFRA, (
            f"infra validation: {e}; nothing was published (recorded in the run's "
            f"metrics.json; the same command with{again or ' the same --run-name'} validates "
            f"again, without retraining)"
        )
    if _raised(e, "components.exporter.PublishError"):
        cause = e.__cause__
        full = isinstance(cause, OSError) and files.disk_full(cause)
        return EXIT_PUBLISH, f"publish: {e}" + (_disk_full_hint(run_id, again) if full else "")
    if _raised(e, "pipeline.stages.ArtifactError"):
        return EXIT_PUBLISH, str(e)
    if isinstance(e, OSError):  # e.g. disk full while writing the run's artifacts
        if files.disk_full(e):
            hint = _disk_full_hint(run_id, again)
            return EXIT_PUBLISH, f"could not write artifacts: {files.os_error_text(e)}{hint}"
        # Not only writes: reading back one of the run's own files can fail (made unreadable).
        return EXIT_PUBLISH, f"could not read or write artifacts: {files.os_error_text(e)}"
    return _memory_or_tensorflow_file_error(e, run_id, again)


def _raised(e: BaseException, *classes: str) -> bool:
    """Whether `e` is an instance of one of `classes` ("module.Class"). A module not imported
    yet raised nothing: it is not imported here (components.data and the trainer import
    TensorFlow, 5 s, which an error found before them, a finished --run-name, need not wait)."""
    for name in classes:
        module, _, cls = name.rpartition(".")
        kind = getattr(sys.modules.get(module), cls, None)
        if isinstance(kind, type) and isinstance(e, kind):
            return True
    return False


def _memory_or_tensorflow_file_error(
    e: BaseException, run_id: str | None, again: str | None
) -> tuple[int, str] | None:
    """map_error's out-of-memory and TensorFlow file errors (which are not OSErrors)."""
    if "tensorflow" not in sys.modules:  # (no TensorFlow error without it)
        return _memory_error(e) if isinstance(e, MemoryError) else None
    import tensorflow as tf

    if isinstance(e, MemoryError) or (
        isinstance(e, tf.errors.ResourceExhaustedError) and "OOM" in (e.message or "")
    ):  # TensorFlow says "OOM when allocating tensor ..." for memory, not for a full disk
        return _memory_error(e)
    if isinstance(
        e,
        (
            tf.errors.ResourceExhaustedError,
            tf.errors.DataLossError,
            tf.errors.FailedPreconditionError,
            tf.errors.PermissionDeniedError,
            tf.errors.NotFoundError,
        ),
    ):
        # TensorFlow's file I/O errors are not OSErrors (e.g. disk full inside SavedModel or
        # TFRecord writers).
        first = (e.message or str(e)).strip().splitlines()[0][:300]
        full = isinstance(e, tf.errors.ResourceExhaustedError)
        hint = _disk_full_hint(run_id, again) if full else ""
        return EXIT_PUBLISH, f"could not write or read a file: {type(e).__name__}: {first}{hint}"
    return None


def _memory_error(e: BaseException) -> tuple[int, str]:
    first = (getattr(e, "message", "") or str(e) or type(e).__name__).strip().splitlines()
    return EXIT_MEMORY, (
        f"out of memory: {first[0][:300] if first else type(e).__name__} (the settings ask "
        f"for more memory than this machine has: e.g. a smaller --batch-size or "
        f"--hidden-units); nothing was published"
    )


def run_name_flag(run_id: str) -> str:
    """The flag that goes on with a run, as the user gives it: under `make train` (which sets
    MNIST_FLAGS_IN_ARGS) flags go in ARGS, beside the ones given there."""
    flag = f"--run-name {run_id}"
    return f"{flag} added to ARGS" if os.environ.get("MNIST_FLAGS_IN_ARGS") else flag


def _disk_full_hint(run_id: str | None, again: str | None = None) -> str:
    if again is None:
        name = run_name_flag(run_id) if run_id else "the same --run-name"
        again = f"run the same command again with {name}: it goes on"
    return f" (disk full? free space and {again})"


def _models(args: argparse.Namespace) -> int:
    from serving import versions

    base = args.artifacts_dir / "models" / versions.MODEL_NAME
    try:
        if args.action in ("list", "rollback") and args.version is not None:
            raise UsageError(
                f"models {args.action} takes no version"
                + (" (it goes back to the previous stable)" if args.action == "rollback" else "")
            )
        if args.action == "list":
            return _list_models(base, args.json)
        if args.action == "rollback":
            old, new, config = versions.rollback(base, args.base_path)
            print(f"stable: version {old} -> {new}; wrote {config}")
            for line in versions.same_version_warning(versions.read_labels(base)):
                print(line)
            return EXIT_OK
        if args.version is None:
            raise UsageError(
                f"models {args.action} needs a version number"
                + (" (or `none` to stop serving a canary)" if args.action == "canary" else "")
            )
        if args.action == "promote":
            if args.version == NO_VERSION:
                raise UsageError("models promote needs a version number")
            config = versions.promote(base, args.version, args.base_path)
        else:
            version = None if args.version == NO_VERSION else args.version
            config = versions.canary(base, version, args.base_path)
        labels = versions.read_labels(base)
        print(
            f"stable: {labels['stable'] or '-'}, canary: {labels['canary'] or '-'}; "
            f"wrote {config} "
            f"(TF Serving re-reads it with --model_config_file_poll_wait_seconds)"
        )
        for line in versions.same_version_warning(labels):
            print(line)
        return EXIT_OK
    except versions.VersionError as e:
        raise UsageError(str(e)) from None


def _list_models(base: Path, as_json: bool) -> int:
    """The table (or JSON) of versions, then a warning line for each label TF Serving could not
    follow (on stderr with --json, so that stdout stays JSON)."""
    from serving import versions

    rows = versions.list_versions(base)
    if not rows and not as_json:  # not an error: nothing published yet
        print(f"no published version under {base} yet: `make train` publishes one")
    else:
        print(json.dumps(rows, indent=2) if as_json else versions.format_table(rows))
    for line in versions.label_warnings(base, rows):
        print(line, file=sys.stderr if as_json else sys.stdout)
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from pipeline.run import NoReport, rebuild_report

    run_dir = args.run_dir
    if not (run_dir / "metrics.json").is_file():
        raise UsageError(f"{run_dir} is not a finished run (no metrics.json)")
    if os.path.lexists(run_dir / "report") and not (run_dir / "report").is_dir():
        return _fail(EXIT_PUBLISH, f"{run_dir / 'report'} is not a folder: move it away")
    from components.report import ReportWriteError

    try:
        written = rebuild_report(run_dir)
    except ReportWriteError as e:
        return _fail(EXIT_PUBLISH, f"{run_dir}: {e.strerror}")
    except NoReport as e:
        return _fail(EXIT_USAGE, str(e))
    except (OSError, ValueError, KeyError) as e:  # a garbled metrics.json or predictions.npz
        return _fail(
            EXIT_DATA,
            f"{run_dir}: the run's files cannot be read to redraw the "
            f"report ({type(e).__name__}: {e})",
        )
    for path in written:
        print(path)
    return EXIT_OK


def _tune(args: argparse.Namespace) -> int:
    check_artifacts_dir(args.artifacts_dir)
    study_dir = args.artifacts_dir / "tuning" / args.study
    if study_dir.exists() and not study_dir.is_dir():
        return _fail(
            EXIT_USAGE,
            f"study {args.study}: {study_dir} exists and is not a folder (move it away; "
            f"the study keeps its trials there)",
        )
    if args.validation_fraction == 0:  # before TensorFlow's import: the search needs it
        return _fail(
            EXIT_USAGE,
            "a search selects on a validation split held out of train: "
            "--validation-fraction must be > 0 (the default is 0.05)",
        )
    from components.tf_import import import_tensorflow

    import_tensorflow()
    from components import tuner

    loaded = _tune_data(args)
    if isinstance(loaded, int):
        return loaded
    try:
        result = tuner.tune(
            _tune_config(args), loaded, study_dir, out=lambda line: print(line, flush=True)
        )
    except (tuner.NoTrialCompleted, tuner.NoValidationSplit) as e:
        return _fail(EXIT_USAGE, str(e))
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM
        e.add_note(TUNE_AGAIN)
        raise
    except Exception as e:
        return _search_failed(e, args.study, study_dir)
    print(tuner.format_trials(result.best))
    hp = result.best["hparams"]
    print(
        f"best: {hp} with {tuner.OBJECTIVE} {result.best['score']:.4f} "
        f"(trial {result.best['trial_id']}); {len(result.trials_run)} trial(s) run now"
    )
    print(
        f"written {study_dir / tuner.BEST_FILE}; train it with:\n"
        f'  make train ARGS="--hparams {study_dir / tuner.BEST_FILE}"'
    )
    return EXIT_OK


def _tune_config(args: argparse.Namespace) -> Any:
    from components import tuner

    return tuner.TuneConfig(
        study=args.study,
        algorithm=args.algorithm,
        max_trials=args.max_trials,
        max_epochs=args.max_epochs,
        time_budget_minutes=args.time_budget,
        validation_fraction=args.validation_fraction,
        seed=args.seed,
        steps_per_execution=TrainConfig().steps_per_execution,
        overwrite=args.overwrite,
    )


def _tune_data(args: argparse.Namespace) -> Any:
    """The device set up and the training split (only: selection never sees the test split),
    or the exit code of a one-line failure."""
    from components import data as data_lib
    from components import strategy

    try:
        strategy.setup_device(args.device, deterministic=False, seed=args.seed)  # no TF_CONFIG
        return data_lib.validate_split(
            data_lib.load_split(
                "train",
                data_dir=args.tfds_data_dir,
                manual_dir=args.tfds_manual_dir,
                limit=args.max_train_examples,
            )
        )
    except strategy.DeviceError as e:
        return _fail(EXIT_USAGE, str(e))
    except data_lib.DataError as e:
        return _fail(EXIT_DATA, f"data: {e}")


def _search_failed(e: Exception, study: str, study_dir: Path) -> int:
    """The exit code and line for a search that failed; re-raises a bug."""
    from components import tuner

    broken = tuner.unreadable_state_file(study_dir) if isinstance(e, ValueError) else None
    if isinstance(e, tuner.DamagedStudy):  # parses, but not the state keras-tuner reads back
        broken = e.path
    if broken is not None:  # json.JSONDecodeError included: keras-tuner's state files
        that = "that file" if broken.suffix == ".json" else "its state files"
        return _fail(
            EXIT_USAGE,
            f"study {study}: {broken} is corrupt ({e}); run again with --overwrite to start "
            f"the study over, or restore {that}",
        )
    mapped = map_error(e, again=TUNE_AGAIN)
    if mapped is None:
        raise e
    return _fail(*mapped)


def without_run_name(train_args: list[str]) -> list[str]:
    """The launcher names the run for every worker: drop the user's --run-name, in any
    spelling argparse accepts (--run-name X, --run-name=X, an unambiguous prefix)."""
    kept: list[str] = []
    skip = False
    for arg in train_args:
        if skip:
            skip = False
        elif arg.startswith("--run-n") and "--run-name".startswith(arg.split("=")[0]):
            skip = "=" not in arg
        else:
            kept.append(arg)
    return kept


def _cluster(args: argparse.Namespace) -> int:
    from pipeline.cluster import run_cluster
    from pipeline.run import new_run_id

    train_args = (
        [a for a in args.train_args if a != "--"]
        if args.train_args[:1] == ["--"]
        else list(args.train_args)
    )
    parsed = build_parser().parse_args(["train", *train_args])  # flag errors: exit 2 here
    resolve_config(parsed)
    check_artifacts_dir(parsed.artifacts_dir)
    run_name = parsed.run_name or new_run_id()
    train_args = without_run_name(train_args)
    return run_cluster(args.workers, train_args, run_name, args.max_restarts)
