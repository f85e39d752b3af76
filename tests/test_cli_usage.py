"""Bad flags: one line on stderr, exit code 2, no traceback, nothing written."""

import subprocess
import sys
import textwrap

import pytest

from tests.helpers import ROOT, no_hang


def run_cli(args, cwd, **kw):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.parametrize(
    "flags",
    [
        ["--epochs", "0"],
        ["--epochs", "-1"],
        ["--epochs", "abc"],
        ["--batch-size", "0"],
        ["--learning-rate", "0"],
        ["--learning-rate", "-0.1"],
        ["--seed", "1.5"],
        ["--device", "tpu"],
        ["--min-accuracy", "2"],
        # beyond what TensorFlow's int64 (or a sane run) takes: a traceback or a run for ever
        ["--epochs", "4294967296"],
        ["--batch-size", "99999999999999999999999"],
        ["--hidden-units", "4294967296"],
        ["--steps-per-execution", "99999999999999999999999"],
        ["--tensorboard-update-freq", "99999999999999999999999"],
        # an empty path would be the current folder, silently
        ["--artifacts-dir", ""],
        ["--hparams", ""],
        ["--tfds-data-dir", " "],
        ["--run-name", "a" * 300],
    ],
)
def test_bad_flags_exit_2_with_one_line(flags, python_cmd, tmp_path):
    r = run_cli(python_cmd + ["train", "--artifacts-dir", str(tmp_path / "a"), *flags], tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "a").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing in the current folder


def test_a_finished_run_name_is_refused_without_importing_tensorflow(tmp_path):
    """`train --run-name` of a finished run: the one line and exit 2 come before TensorFlow's
    import (5 s here) and the data load, through the CLI's own entry point."""
    from pipeline.config import TrainConfig

    run_dir = tmp_path / "a" / "runs" / "done"
    run_dir.mkdir(parents=True)
    TrainConfig().to_json(run_dir / "config.json", {})
    (run_dir / "metrics.json").write_text("{}")
    code = (
        "import sys; from pipeline.cli import main; rc = main(sys.argv[1:]); "
        "print('tensorflow imported' if 'tensorflow' in sys.modules else 'no tensorflow'); "
        "sys.exit(rc)"
    )
    args = ["train", "--run-name", "done", "--artifacts-dir", str(tmp_path / "a")]
    r = run_cli([sys.executable, "-c", code, *args], tmp_path)
    assert r.returncode == 2 and r.stdout.strip() == "no tensorflow", r.stdout + r.stderr
    assert r.stderr.strip() == (
        f"error: run done already finished ({run_dir}); pick another --run-name"
    )


def test_artifacts_path_that_is_a_file(python_cmd, tmp_path):
    (tmp_path / "f").write_text("x")
    r = run_cli(python_cmd + ["train", "--artifacts-dir", str(tmp_path / "f")], tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: --artifacts-dir {tmp_path / 'f'} exists and is not a folder"


def test_artifacts_path_not_writable(python_cmd, tmp_path):
    # /proc refuses new files even to root, unlike a chmod-ed folder.
    r = run_cli(python_cmd + ["train", "--artifacts-dir", "/proc/artifacts"], tmp_path)
    assert r.returncode == 2
    assert "not writable" in r.stderr and "Traceback" not in r.stderr


def test_bad_hparams_file(python_cmd, tmp_path):
    (tmp_path / "hp.json").write_text("{not json")
    r = run_cli(
        python_cmd
        + ["train", "--hparams", str(tmp_path / "hp.json"), "--artifacts-dir", str(tmp_path / "a")],
        tmp_path,
    )
    assert r.returncode == 2 and "cannot read JSON" in r.stderr


def test_help_lists_commands(python_cmd, tmp_path):
    r = run_cli(python_cmd + ["--help"], tmp_path)
    assert r.returncode == 0 and "train" in r.stdout and "report" in r.stdout


def test_train_help_gives_every_setting_its_default_and_range(capsys):
    """The README: every setting has a flag, with its default and range in --help; the range
    shown is the one the flag enforces (the value just outside it is refused)."""
    import re

    from pipeline.cli import main
    from pipeline.config import fields

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse's wrapping undone
    for field in fields():
        assert field.flag in text, field.flag
        default = "none" if field.default is None else field.default
        if field.type in (int, float) and not field.meta["choices"]:
            shown = f"(default {default}; {field.describe_range(null=False)})"
            assert shown in text, (field.name, shown)
            bounds = re.search(r"in [\[(]([-\d.e+]+), ([-\d.e+]+)[\])]", shown)
            if bounds and field.meta["maximum"] is not None:
                with pytest.raises(SystemExit):
                    main(["train", field.flag, str(field.meta["maximum"] * 2 + 1)])
        else:
            assert f"(default {default})" in text, field.name


def test_artifacts_subfolder_that_is_a_file(python_cmd, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tensorboard").write_text("x")
    r = run_cli(python_cmd + ["train", "--artifacts-dir", str(tmp_path / "a")], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: --artifacts-dir {tmp_path / 'a'}: {tmp_path / 'a' / 'tensorboard'} exists and "
        f"is not a folder (move it away; the run writes its tensorboard there)"
    ]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--seed", "4294967296"], "expected an integer in [0, 4294967296)"),
        (["--validation-fraction", "1"], "expected a number in [0, 1)"),
        (["--mixed-precision", "false"], "invalid choice: 'false'"),
        (["--hidden-units", "65537"], "expected an integer in [1, 65536], got '65537'"),
        # a flag cannot be null: the message does not offer it
        (["--max-train-examples", "null"], "expected an integer in [1, 1000000000], got 'null'"),
    ],
)
def test_out_of_range_flags_name_the_range(flags, message, python_cmd, tmp_path):
    r = run_cli(python_cmd + ["train", "--artifacts-dir", str(tmp_path / "a"), *flags], tmp_path)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "hparams,message",
    [
        ({"dropout": "0.1"}, "dropout must be a number in [0, 1)"),
        ({"validation_fraction": None}, "validation_fraction must be a number in [0, 1)"),
        ({"jit_compile": "no"}, "jit_compile must be true or false"),
        ({"mixed_precision": "false"}, "mixed_precision must be one of auto, on, off"),
        ({"batch_size": 99999999999999999999999}, "batch_size must be an integer in [1, 65536]"),
        ({"max_train_examples": -1}, "an integer in [1, 1000000000] (or null), got -1"),
        ('{"epochs": 1, "epochs": 2}', "cannot read JSON (key(s) given twice: epochs)"),
        ("[" * 100_000 + "]" * 100_000, "cannot read JSON (maximum recursion depth exceeded"),
    ],
)
def test_wrong_typed_hparams_are_one_line_exit_2(hparams, message, python_cmd, tmp_path):
    import json

    text = hparams if isinstance(hparams, str) else json.dumps(hparams)
    (tmp_path / "hp.json").write_text(text)
    r = run_cli(
        python_cmd
        + ["train", "--hparams", str(tmp_path / "hp.json"), "--artifacts-dir", str(tmp_path / "a")],
        tmp_path,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()


def test_loading_kept_xla_programs_is_quiet_but_a_real_cpu_mismatch_shows():
    from components.console import is_noise

    prefix = "E0000 00:00:1795724476.358408    4404 "
    assert is_noise(
        prefix + "text_format.cc:378] Error parsing text-format "
        "tensorflow.XlaSerializedCacheEntry: 2:1: Expected identifier, got: 5"
    )
    for hint in ("prefer-no-scatter", "prefer-no-gather"):
        assert is_noise(
            prefix + "cpu_aot_loader.cc:220] Loading XLA:CPU AOT result. Target machine "
            f"feature +{hint} is not  supported on the host machine."
        )
    assert not is_noise(
        prefix + "cpu_aot_loader.cc:220] Loading XLA:CPU AOT result. Target machine "
        "feature +avx512f is not  supported on the host machine."
    )


def test_the_end_of_a_multi_worker_job_is_quiet_but_other_collective_errors_show():
    from components.console import is_noise

    prefix = "E0000 00:00:1795795993.635348    1812 base_collective_executor.cc:252] "
    assert is_noise(
        prefix + "BaseCollectiveExecutor::StartAbort UNAVAILABLE: Failed to send RPC to "
        "coordination service. Either the leader task was preempted/died/restarted"
    )
    assert is_noise(  # seen on the chief after worker 1 finished its part (2026-11-27)
        prefix + "BaseCollectiveExecutor::StartAbort UNAVAILABLE: Error reported from "
        "/job:worker/task:1: The following tasks are unhealthy (stopped sending heartbeats):"
    )
    assert not is_noise(prefix + "BaseCollectiveExecutor::StartAbort INTERNAL: all-reduce failed")
    assert not is_noise("W0000 00:00:1795795993.6 1812 allocator.cc:1] Allocation exceeds 10%")


def test_a_dropped_native_record_takes_its_continuation_lines_but_nothing_later():
    """A multi-worker chief's coordination warning spans lines; all of it is noise. A real
    native error and Python's own output afterwards still show."""
    code = (
        "import os, sys, time\n"
        "from components import console\n"
        "console.setup()\n"
        "os.write(2, b'W0000 00:00:1795724476.358408 4404 coordination_service_agent.cc:1] "
        "Polled an error from coordination service\\n/job:worker/replica:0/task:1\\n"
        "The tasks have crashed. Check the task logs\\n')\n"
        "time.sleep(0.3)\n"
        "os.write(2, b'E0000 00:00:1795724476.9 4404 some.cc:2] a real native error\\n"
        "with its second line\\n')\n"
        "time.sleep(0.3)\n"
        "os.write(2, b'W0000 00:00:1795724477.1 4404 other.cc:3] a real native warning\\n')\n"
        "os.write(2, b'I0000 00:00:1795724477.2 4404 port.cc:153] oneDNN custom operations\\n')\n"
        "time.sleep(0.3)\n"
        "os.write(2, b'terminate called after throwing\\n')\n"
        "print('python says', file=sys.stderr)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    lines = r.stderr.strip().splitlines()
    assert not [x for x in lines if "coordination" in x or "task:1" in x or "crashed" in x], lines
    kept = ("a real native error", "with its second line", "a real native warning")
    for line in (*kept, "terminate called", "python says"):
        assert any(line in x for x in lines), (line, lines)
    assert not [x for x in lines if "oneDNN" in x], lines


def test_h5pys_second_report_of_a_failed_write_is_dropped_but_other_errors_show():
    """A backup's write fails on a full disk (reported in one line); h5py then fails to close
    the file's handles and Cython reports each through sys.excepthook and
    sys.unraisablehook. Those are dropped; any other exception still shows its traceback."""
    code = textwrap.dedent(
        """
        import sys
        from components import console
        console.setup()

        def raised_in(filename, message):  # a traceback with `filename`'s frame alone
            scope = {}
            exec(compile(
                f"try:\\n raise RuntimeError({message!r})\\nexcept RuntimeError as e:\\n error = e",
                filename, "exec"), scope)
            return scope["error"]

        def raised_through_mine(filename, message):  # reached a program's own frame
            try:
                exec(compile(f"raise RuntimeError({message!r})", filename, "exec"))
            except RuntimeError as e:
                return e

        failed = "Can't decrement id ref count (file write failed: errno = 28)"
        for where, message, raised in [
            ("h5py/_objects.pyx", failed, raised_in),
            ("h5py/_objects.pyx", "a real bug in h5py", raised_in),
            ("mine.py", "file write failed in my code", raised_in),
            ("h5py/_hl/files.pyx", "file write failed up to the top", raised_through_mine),
        ]:
            e = raised(where, message)
            sys.excepthook(RuntimeError, e, e.__traceback__)

            class Handle:  # Python reports what __del__ raises through sys.unraisablehook
                def __del__(self):
                    raise e

            Handle.__del__.__qualname__ = where.replace(".pyx", ".ObjectID.__dealloc__")
            Handle()
        print("python goes on", file=sys.stderr)
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert "decrement id ref count" not in r.stderr, r.stderr
    assert r.stderr.count("a real bug in h5py") == 2, r.stderr  # through each hook
    assert r.stderr.count("file write failed in my code") == 2, r.stderr
    # a close that fails and reaches the top of the program is an error of its own: it shows
    assert "file write failed up to the top" in r.stderr, r.stderr
    assert "python goes on" in r.stderr


def test_out_of_memory_is_not_called_a_full_disk():
    """TensorFlow raises ResourceExhaustedError both for a tensor it cannot allocate and for a
    full disk: the first is exit 9 with what to change, the second stays exit 6."""
    import tensorflow as tf

    from pipeline.cli import EXIT_MEMORY, EXIT_PUBLISH, map_error

    oom = tf.errors.ResourceExhaustedError(
        None, None, "OOM when allocating tensor with shape[784,4294967296] and type float"
    )
    code, message = map_error(oom, "r1")
    assert code == EXIT_MEMORY == 9
    assert message.startswith("out of memory: OOM when allocating tensor with shape[784,")
    assert "--batch-size" in message and "disk" not in message
    full = tf.errors.ResourceExhaustedError(None, None, "warmup; No space left on device")
    code, message = map_error(full, "r1")
    assert code == EXIT_PUBLISH and "disk full?" in message
    assert map_error(MemoryError(), "r1")[0] == EXIT_MEMORY


def test_make_tensorboard_refuses_what_tensorboard_would_crash_on(tmp_path):
    """A log folder that is a file, a port that is not one, a port in use: one line, exit 2,
    before TensorBoard starts."""
    import socket

    def launch(*args):
        return subprocess.run(
            [sys.executable, "-m", "pipeline.tensorboard", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    (tmp_path / "tb").write_text("x")
    r = launch("--logdir_spec", f"runs:{tmp_path / 'tb'}", "--port", "6123")
    assert r.returncode == 2 and r.stderr.startswith(f"error: log folder {tmp_path / 'tb'}")
    for port in ("-1", "70000", "http"):
        r = launch("--logdir_spec", f"runs:{tmp_path / 'ok'}", "--port", port)
        assert r.returncode == 2 and "PORT must be a TCP port" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        r = launch(
            "--logdir_spec", f"runs:{tmp_path / 'ok'}", "--host", "127.0.0.1", "--port", port
        )
    assert r.returncode == 2 and f"port {port} on 127.0.0.1" in r.stderr, r.stderr
    assert (tmp_path / "ok").is_dir()  # made by the launcher (the Makefile's mkdir was not)


@pytest.mark.slow
@pytest.mark.parametrize(
    "raised,code,says",
    [
        # a backup whose copies are all unreadable: exit 7, one line, nothing else
        ("BackupError('no copy of the backup at X can be read')", 7, "error: resume: no copy"),
        # a bug of ours: exit 1 with the traceback, for a bug report
        ("ZeroDivisionError('a bug')", 1, "Traceback (most recent call last)"),
    ],
)
def test_exit_codes_7_and_1_through_the_real_entry_point(tmp_path, raised, code, says):
    script = (
        "import runpy, sys\n"
        "import pipeline.run\n"
        "def boom(*a, **k):\n"
        "    from components.trainer import BackupError\n"
        f"    raise {raised}\n"
        "pipeline.run.train_pipeline = boom\n"
        "sys.argv = ['pipeline', 'train', '--artifacts-dir', sys.argv[1]]\n"
        "runpy.run_module('pipeline', run_name='__main__')\n"
    )
    r = run_cli([sys.executable, "-c", script, str(tmp_path / "a")], ROOT)
    assert r.returncode == code, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert any(line.startswith(says) for line in err), err
    if code == 7:
        assert err == ["error: resume: no copy of the backup at X can be read"]


@pytest.mark.slow
def test_verbose_shows_the_library_noise_the_default_hides(tmp_path):
    """The README: TensorFlow's native start-up lines (and the cuInit error on a machine with
    no GPU) are hidden; `--verbose` shows them. Here on a run that imports TensorFlow and
    stops at once (no GPU for `--device gpu`: exit 2, the same one line either way)."""
    cmd = [sys.executable, "-m", "pipeline", "train", "--device", "gpu"]
    cmd += ["--artifacts-dir", str(tmp_path / "a")]
    quiet, verbose = run_cli(cmd, ROOT), run_cli([*cmd, "--verbose"], ROOT)
    assert quiet.returncode == verbose.returncode == 2
    said = "error: --device gpu was requested but TensorFlow sees no GPU"
    assert quiet.stderr.splitlines() == [line for line in quiet.stderr.splitlines() if said in line]
    assert len(quiet.stderr.splitlines()) == 1
    noise = [line for line in verbose.stderr.splitlines() if line.startswith(("I0000", "E0000"))]
    assert noise and said in verbose.stderr.splitlines()[-1]


@pytest.mark.parametrize("both", [False, True])
def test_a_console_whose_reader_left_does_not_stop_the_command(tmp_path, both):
    """`make train | head -3` (or `2>&1 | head`): once the pipe's reader has gone, prints and
    log lines go nowhere and the command goes on to its end (its files are its results):
    no BrokenPipeError taken for a disk error (exit 6), no traceback, exit 0."""
    done = tmp_path / "done"
    code = textwrap.dedent(
        f"""
        import logging, sys, time
        from components import console
        console.setup()
        print("first line", flush=True)
        time.sleep(1.0)  # the reader has read its line and left
        for i in range(20000):  # (more than a pipe's 64 KB buffer holds)
            print("line", i)
            logging.getLogger("pipeline").info("log line %d", i)
        open({str(done)!r}, "w").write("finished")
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if both else subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does once it has its line
    with no_hang(60):
        err = proc.communicate()[1] if proc.stderr else b""
        proc.wait()
    assert proc.returncode == 0, err
    assert done.read_text() == "finished"
    if not both:  # (else stderr went to the pipe too)
        assert b"Traceback" not in err and b"BrokenPipe" not in err, err


@pytest.mark.parametrize(
    "tf_config, handled",
    [
        (None, True),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}', True),
        ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}', False),
        ("{not json", True),  # refused by `train` in one line; until then, a plain process
    ],
)
def test_sigterm_is_one_line_except_in_a_cluster_worker(monkeypatch, tf_config, handled):
    """SIGTERM's one-line handler is installed for a plain process (a TF_CONFIG of one task is
    no cluster); a cluster worker keeps the default, so it ends at once and its launcher sees
    the signal."""
    import signal

    from pipeline import cli

    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    seen = []
    monkeypatch.setattr(
        cli, "_command", lambda args: seen.append(signal.getsignal(signal.SIGTERM)) or 0
    )
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["train"]) == 0
    assert (seen[0] is cli._terminated) is handled
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize(
    ("command", "code", "said"),
    [
        ("train", 0, "warning"),
        ("train", 3, "warning"),
        ("models list", 0, "error"),
        ("models promote", 0, "warning"),  # the labels changed: its code says so
    ],
)
def test_a_run_whose_console_is_full_goes_on_and_says_so_once(
    monkeypatch, capsys, command, code, said
):
    """stdout on a full disk (here /dev/full) during a run: its prints do not raise (they did,
    and the run ended in exit 6 blaming the artifacts' disk); at the end one line says the
    console was lost and a run's own exit code stands; `models list`'s output is its answer: 6."""
    import argparse

    from components import console
    from pipeline import cli

    full = open("/dev/full", "w")  # its descriptor is redirected to /dev/null, then closed
    monkeypatch.setattr(sys, "stdout", console._PipeSafe(full, "stdout"))
    monkeypatch.setattr(console, "_lost", {})
    print("epoch 1/5 ..." * 1000)  # more than the buffer: the write itself fails
    print("Published version 1")
    assert console._lost["stdout"].errno == 28
    name, action = (command.split() + [None])[:2]
    answer = cli._output_written(argparse.Namespace(command=name, action=action), code)
    full.close()
    assert answer == (cli.EXIT_PUBLISH if command == "models list" else code)
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(
        f"{said}: standard output could not be written (No space left on device)"
    )
