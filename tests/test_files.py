"""`files.atomic_write`: the file appears whole or not at all, and nothing is left beside it."""

from pathlib import Path

import numpy as np
import pytest

from mdlm_dmmd.files import atomic_write, is_temporary


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


def test_its_temporaries_are_told_apart_from_other_files(tmp_path):
    for name in ("model.safetensors", "config.json", "stats.npz", "no_suffix", "two\nlines.txt"):
        with atomic_write(tmp_path / name) as tmp:
            assert is_temporary(tmp), tmp.name
            tmp.write_text("x")
    others = ["model.safetensors", "config.json", ".gitattributes", ".model.safetensors.tmp", "a.123-abc.tmp"]
    assert not any(is_temporary(tmp_path / name) for name in others)


def test_a_teacher_directorys_hash_skips_a_leftover_temporary(tmp_path):
    from mdlm_dmmd.algos.distillation import content_hash

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    clean = content_hash(tmp_path)
    (tmp_path / ".model.safetensors.4242-0123abcd.tmp.safetensors").write_bytes(b"half")  # a killed export's
    assert content_hash(tmp_path) == clean
    (tmp_path / "README.md").write_text("a real file counts")
    assert content_hash(tmp_path) != clean


def test_a_directory_hash_tells_names_from_contents(tmp_path):
    """File `a` holding "bc" is not file `ab` holding "c" (the legacy hash ran them together); an
    edited config.json or a renamed file changes the hash."""
    from mdlm_dmmd.algos.distillation import content_hash

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    (one / "a").write_text("bc")
    (two / "ab").write_text("c")
    assert content_hash(one) != content_hash(two)
    assert content_hash(one, legacy=True) == content_hash(two, legacy=True)
    (one / "config.json").write_text('{"time_conditioning": false}')
    before = content_hash(one)
    (one / "config.json").write_text('{"time_conditioning": true}')
    assert content_hash(one) != before
    edited = content_hash(one)
    (one / "a").rename(one / "b")
    assert content_hash(one) != edited


def test_a_resume_accepts_a_teacher_directory_recorded_with_the_legacy_hash(tmp_path):
    from types import SimpleNamespace

    from mdlm_dmmd.algos.distillation import Teacher, content_hash
    from mdlm_dmmd.errors import UserError

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    teacher = SimpleNamespace(path=str(tmp_path), sha256=content_hash(tmp_path))
    for recorded in (content_hash(tmp_path), content_hash(tmp_path, legacy=True)):
        Teacher.check_moved(teacher, SimpleNamespace(teacher_sha256=recorded, teacher="old"), "ckpt")
    with pytest.raises(UserError, match="has other contents"):
        Teacher.check_moved(teacher, SimpleNamespace(teacher_sha256="0" * 64, teacher="old"), "ckpt")
