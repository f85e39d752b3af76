"""XLA's compiled programs kept across runs: only verified entries reach TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from components import compile_cache
from components.files import sha256
from tests.helpers import ROOT

# A fresh process per run (TensorFlow reads TF_XLA_FLAGS once per process): compile and fit a
# small XLA model with the cache under argv[1], or (argv[2] == "raw") with TensorFlow pointed
# straight at the store, as it would be without components/compile_cache.py.
FIT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    root, mode = Path(sys.argv[1]), sys.argv[2]
    from components import compile_cache
    if mode == "raw":
        (store,) = [p for p in root.iterdir() if p.is_dir()]
        os.environ["TF_XLA_FLAGS"] = f"{compile_cache.FLAG}={store}"
    else:
        store = compile_cache.enable(root)
    import keras, numpy as np
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", jit_compile=True,
                  steps_per_execution=2)
    x, y = np.ones((8, 4), np.float32), np.zeros(8, np.int64)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    if mode != "raw":
        print("promoted", len(compile_cache.promote(store)))
    """
)


def _fit(root: Path, mode: str = "cached") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", FIT, str(root), mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"},
    )


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 512):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_corrupted_entry_is_dropped_not_trusted(tmp_path):
    first = _fit(tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "promoted 0" not in first.stdout, first.stdout  # the run's programs were kept
    (store,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    entries = sorted(store.glob("*.pb"))
    manifest = json.loads((store / "manifest.json").read_text())
    assert entries and sorted(manifest) == [p.name for p in entries]

    # The same entries reused: nothing new to promote.
    again = _fit(tmp_path)
    assert again.returncode == 0 and "promoted 0" in again.stdout, again.stderr[-2000:]

    for entry in entries:
        _flip(entry)
    # TensorFlow itself trusts the flipped entry and fails (what the module guards against).
    # Where the flip lands decides how: seen here "Failed to parse serialized
    # CpuAotCompilationResult" (InternalError) and "Can't parse <entry> as binary proto" ...
    raw = _fit(tmp_path, "raw")
    assert raw.returncode != 0, raw.stderr[-300:]
    # ... through the cache the flipped entry is dropped, the run compiles and stores it again.
    after = _fit(tmp_path)
    assert after.returncode == 0, after.stderr[-2000:]
    assert f"promoted {len(entries)}" in after.stdout, after.stdout
    manifest = json.loads((store / "manifest.json").read_text())
    assert all(sha256(p) == manifest[p.name] for p in store.glob("*.pb"))


def test_only_entries_the_manifest_vouches_for_are_kept(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    good, flipped, unlisted = (store / f"{n}.pb" for n in ("good", "flipped", "unlisted"))
    for path in (good, flipped, unlisted):
        path.write_bytes(path.name.encode() * 100)
    manifest = {p.name: sha256(p) for p in (good, flipped)}
    (store / "manifest.json").write_text(json.dumps(manifest))
    _flip(flipped)
    (store / ".good.pb.tmp").write_bytes(b"half a copy")

    assert compile_cache._verified_entries(store) == {"good.pb": manifest["good.pb"]}
    assert sorted(p.name for p in store.iterdir()) == ["good.pb", "manifest.json"]


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"a.pb": 3}'])
def test_an_unreadable_manifest_trusts_nothing(tmp_path, text, caplog):
    (tmp_path / "a.pb").write_bytes(b"x")
    (tmp_path / "manifest.json").write_text(text)
    assert compile_cache._verified_entries(tmp_path) == {}
    assert not (tmp_path / "a.pb").exists()
    if text == "{not json":  # said once, naming the file (a run reads the manifest twice)
        assert compile_cache._verified_entries(tmp_path) == {}
        said = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
        assert said == [
            f"compile cache manifest {tmp_path / 'manifest.json'} is unreadable: starting the "
            "cache afresh"
        ]


def test_an_unwritable_store_is_a_warning_not_a_failure(tmp_path, caplog, monkeypatch):
    private = tmp_path / "private"
    private.mkdir()
    (private / "program.pb").write_bytes(b"compiled")
    monkeypatch.setattr(compile_cache, "_private", private)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    store = compile_cache.enable(blocked)  # nothing to seed from
    assert store is not None and not store.exists()
    assert compile_cache.promote(store) == []
    assert "compile cache not updated" in caplog.text


def test_no_store_is_created_when_nothing_was_compiled(tmp_path, monkeypatch):
    private = tmp_path / "private"
    private.mkdir()
    monkeypatch.setattr(compile_cache, "_private", private)
    store = compile_cache.enable(tmp_path / "cache")
    assert compile_cache.promote(store) == [] and not (tmp_path / "cache").exists()


def test_programs_are_only_shared_between_runs_compiled_the_same_way(monkeypatch):
    from tensorflow.python.framework import config as tf_config

    plain = compile_cache.device_key()
    monkeypatch.setattr(tf_config, "is_op_determinism_enabled", lambda: True)
    deterministic = compile_cache.device_key()
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
    fast_math = compile_cache.device_key()
    assert len({plain, deterministic, fast_math}) == 3
    # ... but not by where this process keeps its private copies
    monkeypatch.setenv("TF_XLA_FLAGS", f"{compile_cache.FLAG}=/somewhere/else")
    assert compile_cache.device_key() == fast_math


def test_the_store_keeps_the_most_recently_used_programs(tmp_path, monkeypatch):
    private, store = tmp_path / "private", tmp_path / "store"
    private.mkdir()
    monkeypatch.setattr(compile_cache, "_private", private)
    monkeypatch.setattr(compile_cache, "MAX_ENTRIES", 2)
    for i, name in enumerate(("old.pb", "unused.pb")):
        (private / name).write_bytes(name.encode())
        assert compile_cache.promote(store) == [name]
        os.utime(store / name, (1000 + i, 1000 + i))
    os.utime(store / "old.pb", (2000, 2000))  # seeded by a later run: recently used
    (private / "new.pb").write_bytes(b"new")
    assert compile_cache.promote(store) == ["new.pb"]
    assert sorted(p.name for p in store.glob("*.pb")) == ["new.pb", "old.pb"]
    assert sorted(json.loads((store / "manifest.json").read_text())) == ["new.pb", "old.pb"]


def test_folders_of_processes_that_are_gone_are_swept(tmp_path):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = tmp_path / f"{compile_cache.PREFIX}{gone.stdout.strip()}-abc"
    alive = tmp_path / f"{compile_cache.PREFIX}{os.getpid()}-def"
    for folder in (dead, alive):
        folder.mkdir()
    compile_cache._sweep(tmp_path)
    assert not dead.exists() and alive.exists()


def test_processes_started_from_a_run_do_not_get_its_folder():
    env = {"TF_XLA_FLAGS": f"--tf_xla_auto_jit=1 {compile_cache.FLAG}=/tmp/x"}
    assert compile_cache.without_flag(env) == ["--tf_xla_auto_jit=1"]


def test_stores_unused_for_a_month_are_pruned(tmp_path, monkeypatch):
    private = tmp_path / "private"
    private.mkdir()
    monkeypatch.setattr(compile_cache, "_private", private)
    root = tmp_path / "xla"
    old, recent = root / "tf-old", root / "tf-recent"
    for store in (old, recent):
        store.mkdir(parents=True)
        (store / "manifest.json").write_text("{}")
    month = 31 * 86400
    os.utime(old / "manifest.json", (os.path.getmtime(old) - month,) * 2)
    os.utime(old, (os.path.getmtime(old) - month,) * 2)
    compile_cache.enable(root)
    assert not old.exists() and recent.exists()
