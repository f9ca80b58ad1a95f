"""Faults a long run meets on a shared machine: a second run into a busy folder, two runs sharing one cache, a
damaged cache entry, a full disk. Each ends in one line (or a warning and a recomputation), never a traceback, and
never loses finished work."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError
from sentence_transformers import SentenceTransformer
from test_runner import run_cli, tiny_recipe, write

import prod_st.retrieval.corpus_index as corpus_index
import prod_st.teachers.training as teacher_training
from prod_st.teachers.cache import EmbeddingCache, ScoreCache, release_embedding_cache
from prod_st.util import locks
from prod_st.util.errors import DiskFullError
from prod_st.util.paths import disk_full_error, load_cached_array, write_text_atomic

REPO = Path(__file__).resolve().parents[1]


def hold(what: str, folder: Path, *, create: bool = True) -> subprocess.Popen:
    """Another process that holds `folder` (`what`: "run" = the run folder's lock, "use" = a cache entry's shared
    lock, "train" = a teacher's training lock) until killed; returns once it holds it."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from prod_st.util import locks
        folder = Path({str(folder)!r})
        if {what!r} == "run":
            folder.mkdir(parents=True, exist_ok=True)
            held = locks.lock_run_folder(folder)
        elif {what!r} == "use":
            locks.use(folder)
        print("held", flush=True)
        time.sleep(600)
    """)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "cli"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# ---- a second run into one folder --------------------------------------------------------------------------
def test_a_second_run_into_a_busy_folder_exits_2_naming_the_first_and_touches_nothing(
    monkeypatch, capsys, tmp_path, tiny_model_dir
):
    run_dir = tmp_path / "run"
    other = hold("run", run_dir)
    try:
        path = write(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir))
        code, errors = run_cli(monkeypatch, capsys, "run", str(path), "--output", str(run_dir))
        assert code == 2 and len(errors) == 1
        assert "is in use by another prod-st command" in errors[0]
        assert f"pid {other.pid} on {socket.gethostname()}, started" in errors[0]
        assert [p.name for p in run_dir.iterdir()] == [locks.RUN_LOCK]  # no marker, no recipe: nothing of its own
    finally:
        kill9(other)
    # kill -9 leaves the file but not the lock: the next run takes the folder, no clean-up needed
    held = locks.lock_run_folder(run_dir)
    assert json.loads((run_dir / locks.RUN_LOCK).read_text())["pid"] == os.getpid()
    held.release()


def test_the_run_lock_is_held_for_the_runs_life_and_released_at_its_end(tmp_path, tiny_model_dir, monkeypatch):
    from prod_st.recipe import load_recipe
    from prod_st.runner import Runner

    recipe = tiny_recipe(tiny_model_dir)
    recipe["stages"], recipe["dpd"] = recipe["stages"][:1], None
    runner = Runner(load_recipe(write(tmp_path / "r.yaml", recipe)), tmp_path / "run")
    seen = []
    real = Runner.run_steps

    def check_busy(self, started):
        code = f"from prod_st.util import locks; from pathlib import Path; locks.lock_run_folder(Path({str(self.dir)!r}))"
        env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert other.returncode != 0 and "is in use by another prod-st command" in other.stderr
        seen.append(True)
        return real(self, started)

    monkeypatch.setattr(Runner, "run_steps", check_busy)
    runner.run()
    assert seen == [True]
    locks.lock_run_folder(tmp_path / "run").release()  # free again once the run ended


def test_force_and_a_folder_left_with_only_a_lock_file(tmp_path):
    from prod_st.run import run_folder

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / locks.RUN_LOCK).write_text("")  # a run killed between taking the folder and writing its marker
    assert run_folder.check_folder(folder, "tiny", force=False) is False  # still a new folder, not a stranger's
    run_folder.create(folder, "tiny")
    (folder / "01-warmup").mkdir()
    assert run_folder.clear(folder) == ["01-warmup"]  # --force keeps the marker and the lock this run holds
    assert (folder / locks.RUN_LOCK).exists()


# ---- two runs sharing one cache ----------------------------------------------------------------------------
def test_a_cache_entry_another_process_reads_is_kept_and_removed_once_it_is_free(tmp_path):
    entry = tmp_path / "corpus" / "key"
    locks.use(entry)
    (entry / "block-000000-of-000001-4.npy").write_bytes(b"x")
    other = hold("use", entry)
    try:
        assert locks.remove_unless_used(entry, lambda f: __import__("shutil").rmtree(f)) is False
        assert (entry / "block-000000-of-000001-4.npy").exists()
    finally:
        kill9(other)
    assert locks.remove_unless_used(entry, lambda f: __import__("shutil").rmtree(f)) is True
    assert not entry.exists()
    locks.use(entry)  # made anew by the next reader
    assert (entry / locks.IN_USE).exists()
    locks.drop(entry)


def test_release_keeps_a_corpus_encoding_and_embeddings_another_run_reads(tmp_path, tiny_model_dir):
    corpus = __import__("datasets").Dataset.from_dict({"_id": ["a", "b", "c"], "title": ["", "", ""],
                                                      "text": ["one", "two", "three"]})
    model = SentenceTransformer(tiny_model_dir)
    key = corpus_index.cache_key(model, corpus)
    corpus_index.corpus_embeddings(model, corpus, progress=False)
    folder = corpus_index.cache_path("corpus", key)
    cache = EmbeddingCache(tmp_path / "student" / "embeddings")
    cache.put_many(["q"], [np.ones(4, np.float32)])
    others = [hold("use", folder), hold("use", tmp_path / "student" / "embeddings")]
    try:
        corpus_index.release(key)
        assert release_embedding_cache(tmp_path / "student") is False
        assert list(folder.glob("block-*.npy")) and list((tmp_path / "student" / "embeddings").glob("part-*"))
    finally:
        for other in others:
            kill9(other)
    locks.use(folder)  # this run reads it again, then releases it: now nobody else does
    corpus_index.release(key)
    assert not folder.exists()
    assert release_embedding_cache(tmp_path / "student") is True and not (tmp_path / "student").exists()


def test_a_teacher_two_runs_want_is_trained_once(tmp_path, monkeypatch):
    """The second run waits on the first's training lock, then loads what the first trained."""
    trained = tmp_path / "teachers" / "trained"
    monkeypatch.setattr(teacher_training, "model_fingerprint", lambda model: "base")
    key = teacher_training.text_key("base", teacher_training.rows_key([]), settings={"kind": "bi-encoder"})
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from prod_st.util import locks
        trained = Path({str(trained)!r})
        with locks.exclusive(trained / ".{key}.lock", "waiting"):
            print("held", flush=True)
            time.sleep(1.5)
            (trained / "{key}").mkdir(parents=True)
            (trained / "{key}" / "DONE").write_text("{{}}")
    """)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert first.stdout.readline().strip() == "held"
    started = time.monotonic()

    def train(model, workdir):
        raise AssertionError("trained a second time")

    loaded = teacher_training._cached_training("bi-encoder", object(), [], {}, tmp_path / "teachers", train,
                                               lambda path: path)
    first.wait()
    assert loaded == trained / key and time.monotonic() - started > 0.5  # it waited, then loaded


# ---- a damaged cache entry ---------------------------------------------------------------------------------
def spoil(path: Path) -> None:
    """Garbage over the start of a file, as a disk error or a killed copy leaves it."""
    with open(path, "r+b") as f:
        f.write(b"garbage!" * 64)


def test_a_damaged_arrow_copy_of_a_data_file_is_made_again(tmp_path, caplog):
    from prod_st.data.beir_files import read_table

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "d1", "title": "a", "text": "hello"}\n{"_id": "d2", "title": "b", "text": "world"}\n')
    first = read_table(corpus, "corpus")
    spoil(Path(first.cache_files[0]["filename"]))
    with caplog.at_level(logging.WARNING):
        again = read_table(corpus, "corpus")  # pyarrow.lib.ArrowInvalid before
    assert again["_id"] == ["d1", "d2"] and again["text"] == ["hello", "world"]
    assert "damaged cache entry" in caplog.text


def test_a_damaged_score_shard_is_removed_and_its_values_computed_again(tmp_path, caplog):
    from prod_st.teachers.cache import fill_missing

    cache = ScoreCache(tmp_path)
    cache.put_many(["a", "b"], [1.0, 2.0])
    cache.put_many(["c"], [3.0])
    shards = sorted(tmp_path.glob("part-*.arrow"))
    spoil(shards[0])
    with caplog.at_level(logging.WARNING):
        reopened = ScoreCache(tmp_path)
    assert "damaged cache entry" in caplog.text and not shards[0].exists()
    assert reopened.get_many(["a", "b", "c"]) == {"c": 3.0}
    computed = fill_missing(reopened, {"a": "a", "b": "b", "c": "c"}, lambda xs: [float(ord(x)) for x in xs],
                            chunk_size=8, length=len, progress=False)
    assert computed == 2 and ScoreCache(tmp_path).get_many(["a", "b", "c"]) == {"a": 97.0, "b": 98.0, "c": 3.0}


def test_a_damaged_corpus_block_is_encoded_again(tiny_model_dir, caplog):
    corpus = __import__("datasets").Dataset.from_dict({"_id": list("abcdef"), "title": [""] * 6,
                                                      "text": ["one", "two", "three", "four", "five", "six"]})
    model = SentenceTransformer(tiny_model_dir)
    first = np.concatenate(corpus_index.corpus_embeddings(model, corpus, block_size=4, progress=False))
    key = corpus_index.cache_key(model, corpus)
    blocks = sorted(corpus_index.cache_path("corpus", key).glob("block-*.npy"))
    blocks[1].write_bytes(blocks[1].read_bytes()[:-8])  # truncated: np.load would refuse to map it
    before = corpus_index.encoded_docs[key]
    with caplog.at_level(logging.WARNING):
        again = np.concatenate(corpus_index.corpus_embeddings(model, corpus, block_size=4, progress=False))
    assert corpus_index.encoded_docs[key] - before == 2  # the damaged block's 2 documents, not all 6
    assert np.allclose(again, first, atol=1e-6) and "damaged cache entry" in caplog.text


def test_load_cached_array_refuses_garbage_truncation_and_a_wrong_length(tmp_path):
    path = tmp_path / "run.npy"
    np.save(path, np.arange(12, dtype=np.int32).reshape(4, 3))
    assert load_cached_array(path, rows=4).tolist()[3] == [9, 10, 11]
    assert load_cached_array(path, rows=5) is None and not path.exists()  # a run for other queries
    np.save(path, np.zeros((4, 3)))
    spoil(path)
    assert load_cached_array(path) is None and not path.exists()
    assert load_cached_array(tmp_path / "absent.npy") is None


def test_a_damaged_cached_teacher_is_trained_again(tmp_path, monkeypatch):
    trained = tmp_path / "teachers" / "trained"
    monkeypatch.setattr(teacher_training, "model_fingerprint", lambda model: "base")
    key = teacher_training.text_key("base", teacher_training.rows_key([]), settings={"kind": "bi-encoder"})
    (trained / key).mkdir(parents=True)
    (trained / key / "DONE").write_text("{}")
    (trained / key / "model.safetensors").write_bytes(b"garbage")
    calls = []

    def load(path):
        if (path / "model.safetensors").read_bytes() == b"garbage":
            raise SafetensorError("Error while deserializing header: header too large")
        return path

    class Model:
        def save(self, path):
            Path(path).mkdir(parents=True)
            (Path(path) / "model.safetensors").write_bytes(b"weights")

    loaded = teacher_training._cached_training("bi-encoder", Model(), [], {}, tmp_path / "teachers",
                                               lambda model, workdir: calls.append(workdir), load)
    assert len(calls) == 1 and (loaded / "model.safetensors").read_bytes() == b"weights"


def test_cached_data_damaged_between_two_runs_is_rebuilt_and_the_run_ends(monkeypatch, capsys, tmp_path,
                                                                          tiny_model_dir):
    """A whole run on a cache where every Arrow file and array another run left has garbage written into it."""
    path = write(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir))
    assert run_cli(monkeypatch, capsys, "run", str(path), "--output", str(tmp_path / "first")) == (0, [])
    cache = Path(os.environ["PROD_ST_CACHE"])
    spoiled = [p for p in cache.rglob("*") if p.is_file() and p.suffix in (".arrow", ".npy")]
    assert {p.suffix for p in spoiled} == {".arrow", ".npy"}
    for p in spoiled:
        spoil(p)
    assert run_cli(monkeypatch, capsys, "run", str(path), "--output", str(tmp_path / "second")) == (0, [])
    first, second = (json.loads((tmp_path / n / "final.json").read_text()) for n in ("first", "second"))
    assert second["test"]["student"] == first["test"]["student"]


# ---- a full disk -------------------------------------------------------------------------------------------
def test_disk_full_errors_name_the_path_and_the_space_left(tmp_path):
    error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "a.npy"))
    full = disk_full_error(error)
    assert isinstance(full, DiskFullError) and full.exit_code == 4
    assert str(tmp_path / "a.npy") in str(full) and " free on its file system" in str(full)
    try:  # a library's own exception raised while handling it (torch, datasets)
        try:
            raise error
        except OSError as e:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from e
    except RuntimeError as wrapped:
        assert disk_full_error(wrapped) is not None
    assert disk_full_error(SafetensorError("I/O error: No space left on device (os error 28)"), tmp_path) is not None
    assert disk_full_error(OSError(errno.EACCES, "Permission denied")) is None
    assert disk_full_error(ValueError("no")) is None


def test_an_atomic_write_on_a_full_disk_is_exit_4_and_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "final.json"
    target.write_text("old")
    real_write_text = Path.write_text

    def half_then_full(self, text, *args, **kwargs):  # the temp file gets half the text, then the disk is full
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(DiskFullError, match=f"writing {target}"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["final.json"]


def test_a_full_disk_mid_run_is_one_line_exit_4_then_the_rerun_resumes(monkeypatch, capsys, caplog, tmp_path,
                                                                       tiny_model_dir):
    run_dir = tmp_path / "run"
    path = write(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir))
    real_save = SentenceTransformer.save

    def full_in_bi(self, folder, *args, **kwargs):
        if Path(folder).parent.name == "02-bi":  # safetensors' own words, as a real full disk gives them
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(self, folder, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "save", full_in_bi)
    code, errors = run_cli(monkeypatch, capsys, "run", str(path), "--output", str(run_dir))
    assert code == 4 and len(errors) == 1, errors
    assert f"no space left on the device writing {run_dir / '02-bi' / 'student'} (" in errors[0]
    assert "run the same command again" in errors[0]
    assert (run_dir / "01-warmup" / "DONE").exists() and not (run_dir / "02-bi" / "DONE").exists()

    monkeypatch.setattr(SentenceTransformer, "save", real_save)
    with caplog.at_level(logging.INFO, logger="prod_st.run"):
        assert run_cli(monkeypatch, capsys, "run", str(path), "--output", str(run_dir)) == (0, [])
    assert "redoing 02-bi (from its last checkpoint), 03-ce, 04-dpd-1, final; keeping 00-init, 01-warmup" in caplog.text


def test_what_a_killed_teacher_training_left_is_removed_when_the_key_is_trained(tmp_path, monkeypatch):
    trained = tmp_path / "teachers" / "trained"
    monkeypatch.setattr(teacher_training, "model_fingerprint", lambda model: "base")
    key = teacher_training.text_key("base", teacher_training.rows_key([]), settings={"kind": "bi-encoder"})
    left = trained / f".{key}.work-rank0"  # a run killed while saving its model
    (left / "model").mkdir(parents=True)
    (left / "model" / "model.safetensors").write_bytes(b"half")
    other = trained / ".another-key.work-rank0"  # another teacher's: not this training's to touch
    other.mkdir()
    seen = []

    class Model:
        def save(self, path):
            Path(path).mkdir(parents=True)
            (Path(path) / "model.safetensors").write_bytes(b"weights")

    loaded = teacher_training._cached_training("bi-encoder", Model(), [], {}, tmp_path / "teachers",
                                               lambda model, workdir: seen.append(workdir.parent.exists()),
                                               lambda path: path)
    assert (loaded / "model.safetensors").read_bytes() == b"weights" and seen == [False]
    assert sorted(p.name for p in trained.iterdir()) == sorted([key, f".{key}.lock", other.name])
