"""`files.atomic_write`: the file appears whole or not at all, and nothing is left beside it."""

from pathlib import Path

import numpy as np
import pytest

from mdlm_dmmd.files import atomic_write


def test_the_file_appears_only_when_the_block_ends(tmp_path):
    target = tmp_path / "cache.json"
    with atomic_write(target) as tmp:
        tmp.write_text("whole")
        assert not target.exists() and tmp.parent == tmp_path and tmp.name.startswith(".")
    assert target.read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt("disk full")])
def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path, error):
    target = tmp_path / "teacher.ckpt"
    target.write_text("old")
    with pytest.raises(type(error), match="disk full"):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise error
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.ckpt"]


def test_the_writers_error_survives_a_failing_cleanup(tmp_path, monkeypatch):
    def unlink(self, missing_ok=False):
        raise PermissionError("read-only folder")
    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(ValueError, match="the writer's"):
        with atomic_write(tmp_path / "x.json"):
            raise ValueError("the writer's")


def test_the_temporary_name_keeps_the_suffix_and_is_unique(tmp_path):
    target = tmp_path / "stats.npz"
    with atomic_write(target) as first, atomic_write(target) as second:  # two writers at once
        assert first != second  # (another rank, process or machine) never share a name
        np.savez(first, mu=np.arange(3))  # np.savez appends .npz to a name without it
        np.savez(second, mu=np.arange(4))
    assert np.load(target)["mu"].tolist() == [0, 1, 2]  # the last to finish wins, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]
