"""The cache folder and the outputs of commands: refused before any work when they cannot be written, and
written atomically (a failed write leaves neither half a file nor a temporary one)."""

from __future__ import annotations

import os

import pytest

from prod_st.util.errors import DiskFullError, ProdStError
from prod_st.util.paths import cache_dir, check_output_file, check_output_folder, write_folder_atomic, write_text_atomic


def test_cache_under_a_file_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("PROD_ST_CACHE", str(tmp_path / "a-file"))
    with pytest.raises(ProdStError, match=r"a-file is a file, not a folder: set PROD_ST_CACHE to a writable folder"):
        cache_dir("arrow")


def test_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    """os.access says whether this user may write (root may write anywhere except on read-only mounts)."""
    monkeypatch.setenv("PROD_ST_CACHE", str(tmp_path / "cache"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    with pytest.raises(ProdStError, match=rf"{tmp_path} is not writable: set PROD_ST_CACHE"):
        cache_dir("arrow")
    assert not (tmp_path / "cache").exists()


def test_cache_is_created(tmp_path, monkeypatch):
    monkeypatch.setenv("PROD_ST_CACHE", str(tmp_path / "new" / "cache"))
    assert cache_dir("arrow", "x") == tmp_path / "new" / "cache" / "arrow" / "x" and (tmp_path / "new").is_dir()


def test_output_file_checks_create_nothing(tmp_path):
    (tmp_path / "a-file").write_text("")
    assert check_output_file(tmp_path / "deep" / "er" / "m.json") == tmp_path / "deep" / "er" / "m.json"
    assert check_output_file(tmp_path / "a-file") == tmp_path / "a-file"  # an existing file is replaced later
    with pytest.raises(ProdStError, match="is a folder: give the path of a file"):
        check_output_file(tmp_path)
    with pytest.raises(ProdStError, match=r"cannot write output file .*a-file/x/m\.json: .*a-file is a file"):
        check_output_file(tmp_path / "a-file" / "x" / "m.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_output_folder_must_be_new_or_empty(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("")
    assert check_output_folder(tmp_path / "empty") == tmp_path / "empty"
    assert check_output_folder(tmp_path / "new" / "folder") == tmp_path / "new" / "folder"
    for path, message in ((tmp_path / "full", "is not empty"), (tmp_path / "a-file", "is a file"),
                          (tmp_path / "a-file" / "s", "a-file is a file")):
        with pytest.raises(ProdStError, match=message):
            check_output_folder(path)


def test_write_text_atomic_replaces_or_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "m.json"
    write_text_atomic(target, "one\n")
    write_text_atomic(target, "two\n")
    assert target.read_text() == "two\n"

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(DiskFullError, match=r"no space left on the device writing .*m\.json \(.* free"):
        write_text_atomic(target, "three\n")

    def denied(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(ProdStError, match=r"cannot write .*m\.json: Permission denied"):
        write_text_atomic(target, "three\n")
    assert target.read_text() == "two\n" and [p.name for p in target.parent.iterdir()] == ["m.json"]


def test_write_folder_atomic_leaves_nothing_when_the_write_fails(tmp_path):
    def half(folder):
        (folder / "part").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_folder_atomic(tmp_path / "out", half)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()  # an empty folder is replaced
    write_folder_atomic(tmp_path / "out", lambda folder: (folder / "whole").write_text("ok"))
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "whole").read_text() == "ok"
