"""The data cache is built by local rank 0 only; the other processes a launcher started wait."""

import os
import threading
import time

import pytest

from mdlm_dmmd.data import once
from mdlm_dmmd.errors import UserError


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(once, "POLL_SECONDS", 0.01)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)


def write_cache(tmp):
    tmp.mkdir()
    (tmp / "rows").write_text("tokens")


def later(seconds, action):
    thread = threading.Thread(target=lambda: (time.sleep(seconds), action()))
    thread.start()
    return thread


def test_local_rank_from_torchrun_or_slurm(monkeypatch):
    assert once.local_rank() == 0
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert once.local_rank() == 3
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert once.local_rank() == 1


def test_rank_0_builds_under_a_temporary_name(tmp_path):
    path = tmp_path / "cache" / "owt_1024_train"
    seen = []
    once.build_once(path, lambda tmp: (seen.append(tmp), write_cache(tmp)))
    assert (path / "rows").read_text() == "tokens" and not seen[0].exists() and seen[0] != path
    once.build_once(path, lambda tmp: pytest.fail("built twice"))  # there: nothing to do


def test_a_failed_build_leaves_no_cache_and_tells_the_others(tmp_path):
    path = tmp_path / "owt_1024_train"

    def fails(tmp):
        write_cache(tmp)
        raise UserError("data 'openwebtext' needs the Hugging Face hub")

    with pytest.raises(UserError, match="needs the Hugging Face hub"):
        once.build_once(path, fails)
    assert not path.exists() and [p.name for p in tmp_path.iterdir()] == ["owt_1024_train.failed"]


def test_a_cache_another_machine_finished_first_is_kept(tmp_path):
    path = tmp_path / "owt_1024_train"

    def slower(tmp):
        write_cache(path)  # the other machine's copy, complete before ours
        write_cache(tmp)

    once.build_once(path, slower)
    assert (path / "rows").exists() and [p.name for p in tmp_path.iterdir()] == ["owt_1024_train"]


def test_other_processes_wait_for_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    path = tmp_path / "owt_1024_train"
    thread = later(0.2, lambda: write_cache(path))
    started = time.time()
    once.build_once(path, lambda tmp: pytest.fail("only local rank 0 builds"))
    assert time.time() - started >= 0.2 and path.exists()
    thread.join()


def test_a_waiting_process_fails_with_rank_0s_error_but_not_an_old_one(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    path = tmp_path / "owt_1024_train"
    marker = once.failure_marker(path)
    marker.write_text("UserError: from an earlier run")
    os.utime(marker, (time.time() - 3600, time.time() - 3600))
    thread = later(0.1, lambda: write_cache(path))
    once.build_once(path, lambda tmp: None)  # the stale marker is ignored
    thread.join()

    other = tmp_path / "owt_1024_valid"
    thread = later(0.1, lambda: once.failure_marker(other).write_text("UserError: no network"))
    with pytest.raises(UserError, match="local rank 0 failed to build the data cache .*: UserError: no network"):
        once.build_once(other, lambda tmp: None)
    thread.join()
