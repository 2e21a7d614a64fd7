"""``replace_dir`` / ``staging_dir``: a complete destination at every moment."""

import os
import sys

import pytest

from orthrus_jax import folders
from orthrus_jax.folders import replace_dir, staging_dir


def _tree(path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def _folder(path, **files) -> None:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_an_existing_destination_is_swapped_in_one_step(tmp_path, monkeypatch):
    _folder(tmp_path / "dst", a="old")
    _folder(tmp_path / "new", a="new", b="2")
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(folders.os, "rename", lambda *a: (renames.append(a), real_rename(*a)))
    replace_dir(tmp_path / "new", tmp_path / "dst")
    assert _tree(tmp_path / "dst") == {"a": "new", "b": "2"}
    assert renames == []  # no moment without a dst: one exchange, not two renames
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # the old copy deleted


def test_without_an_exchange_the_old_folder_is_moved_aside_then_removed(tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(folders, "_exchange", lambda a, b: False)
    _folder(tmp_path / "dst", a="old")
    _folder(tmp_path / "new", a="new")
    replace_dir(tmp_path / "new", tmp_path / "dst")
    assert _tree(tmp_path / "dst") == {"a": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_a_new_destination_is_a_rename(tmp_path):
    _folder(tmp_path / "new", a="new")
    replace_dir(tmp_path / "new", tmp_path / "sub")
    assert _tree(tmp_path / "sub") == {"a": "new"}
    assert not (tmp_path / "new").exists()


def test_a_failed_write_leaves_the_destination_as_it_was(tmp_path):
    _folder(tmp_path / "dst", a="old")
    with pytest.raises(RuntimeError), staging_dir(tmp_path / "dst", force=True) as stage:
        (stage / "a").write_text("half")
        raise RuntimeError("killed")
    assert _tree(tmp_path / "dst") == {"a": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # no staging folder left
    with staging_dir(tmp_path / "dst", force=True) as stage:
        (stage / "a").write_text("whole")
    assert _tree(tmp_path / "dst") == {"a": "whole"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
    with pytest.raises(FileExistsError, match="dst already exists"), \
            staging_dir(tmp_path / "dst"):
        pass
