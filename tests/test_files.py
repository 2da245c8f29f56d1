"""Files written whole or not at all (aefast._files): checkpoints, evaluations, manifests."""

from __future__ import annotations

import os

import pytest

from aefast._files import replace_atomically, replace_text_atomically


def test_a_write_replaces_the_file_whole_and_syncs_data_before_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    replace_atomically(path, lambda file: file.write(b"new contents"))
    assert path.read_bytes() == b"new contents"
    assert calls[:2] == ["fsync", "replace"]  # the data on disk before the name points at it
    assert calls[2:] == (["fsync"] if hasattr(os, "O_DIRECTORY") else [])  # then the folder's entry
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    replace_text_atomically(tmp_path / "evaluation.json", "{}\n")
    assert (tmp_path / "evaluation.json").read_text() == "{}\n"


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, failure):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")

    def half_then_fail(file):
        file.write(b"half")
        raise failure

    with pytest.raises(type(failure)):
        replace_atomically(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
