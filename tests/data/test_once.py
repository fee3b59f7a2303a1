"""The data cache is built by local rank 0 only; the other processes a launcher started wait."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import datasets
import pytest

from mdlm_dmmd.data import build_data, once
from mdlm_dmmd.errors import UserError

pytestmark = pytest.mark.timeout(30)  # a wait that never ends fails instead of hanging the suite


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(once, "POLL_SECONDS", 0.01)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)


def write_cache(folder):
    folder.mkdir(exist_ok=True)
    (folder / "rows").write_text("tokens")


def later(seconds, action):
    thread = threading.Thread(target=lambda: (time.sleep(seconds), action()))
    thread.start()
    return thread


def helper(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_rank_0_builds_in_a_temporary_folder_and_leaves_no_notes(tmp_path):
    path = tmp_path / "cache" / "owt_1024_train"
    seen = []
    once.build_once(path, lambda tmp: (seen.append(tmp), write_cache(tmp)))
    assert (path / "rows").read_text() == "tokens" and seen[0] != path
    assert [p.name for p in path.parent.iterdir()] == ["owt_1024_train"]
    once.build_once(path, lambda tmp: pytest.fail("built twice"))  # there: nothing to do


def test_a_failed_build_leaves_no_cache_and_fails_the_others_whenever_they_come(tmp_path, monkeypatch):
    path = tmp_path / "owt_1024_train"

    def fails(tmp):
        write_cache(tmp)
        raise UserError("data 'openwebtext' needs the Hugging Face hub")

    with pytest.raises(UserError, match="needs the Hugging Face hub"):
        once.build_once(path, fails)
    assert not path.exists() and [p.name for p in tmp_path.iterdir()] == [f"owt_1024_train.failed-{socket.gethostname()}"]
    helper(monkeypatch)  # starts waiting after rank 0 failed
    with pytest.raises(UserError, match="local rank 0 failed to build the data cache .*needs the Hugging Face hub"):
        once.build_once(path, lambda tmp: None)


def test_a_cache_another_machine_finished_first_is_kept(tmp_path):
    path = tmp_path / "owt_1024_train"

    def slower(tmp):
        write_cache(path)  # the other machine's copy, complete before ours
        write_cache(tmp)

    once.build_once(path, slower)
    assert (path / "rows").exists() and [p.name for p in tmp_path.iterdir()] == ["owt_1024_train"]


def test_other_processes_wait_for_the_cache(tmp_path, monkeypatch):
    helper(monkeypatch)
    path = tmp_path / "owt_1024_train"
    thread = later(0.2, lambda: write_cache(path))
    started = time.time()
    once.build_once(path, lambda tmp: pytest.fail("only local rank 0 builds"))
    assert time.time() - started >= 0.2 and path.exists()
    thread.join()


def test_notes_of_another_launch_are_ignored(tmp_path, monkeypatch):
    helper(monkeypatch)
    path = tmp_path / "owt_1024_train"
    once.note(path, "failed").write_text("parent 1\nUserError: from an earlier launch")
    once.note(path, "building").write_text(f"parent 1\n{dead_pid()}")
    thread = later(0.1, lambda: write_cache(path))
    once.build_once(path, lambda tmp: None)
    thread.join()


def test_notes_of_an_earlier_torchrun_attempt_are_ignored(tmp_path, monkeypatch):
    """torchrun restarts a failed group from the same agent (the same parent pid): the restart
    count tells the attempts apart, so attempt 1 waits instead of failing with attempt 0's notes."""
    helper(monkeypatch)
    path = tmp_path / "owt_1024_train"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    once.note(path, "failed").write_text(f"{once.launch_id()}\nUserError: attempt 0 failed")
    once.note(path, "building").write_text(f"{once.launch_id()}\n{dead_pid()}")
    assert once.read_note(once.note(path, "failed")) == "UserError: attempt 0 failed"  # its own attempt reads it
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert once.read_note(once.note(path, "failed")) is None
    thread = later(0.1, lambda: write_cache(path))
    once.build_once(path, lambda tmp: None)
    thread.join()


def test_a_successful_build_clears_a_failure_note_of_its_own_launch(tmp_path):
    path = tmp_path / "owt_1024_train"
    once.note(path, "failed").write_text(f"{once.launch_id()}\nUserError: an earlier try")
    once.build_once(path, write_cache)
    assert [p.name for p in tmp_path.iterdir()] == ["owt_1024_train"]


def test_a_waiting_process_fails_when_the_builder_is_gone(tmp_path, monkeypatch):
    helper(monkeypatch)
    path = tmp_path / "owt_1024_train"
    once.note(path, "building").write_text(f"{once.launch_id()}\n{dead_pid()}")  # killed: no failure note
    with pytest.raises(UserError, match=r"local rank 0 \(pid \d+\) ended while building the data cache"):
        once.build_once(path, lambda tmp: None)


def test_rank_0_removes_the_folders_of_killed_builds_on_this_machine(tmp_path):
    path = tmp_path / "owt_1024_train"
    killed = tmp_path / f"owt_1024_train.tmp-{socket.gethostname()}-{dead_pid()}-abc"
    running = tmp_path / f"owt_1024_train.tmp-{socket.gethostname()}-{os.getppid()}-def"
    elsewhere = tmp_path / f"owt_1024_train.tmp-other-host-{dead_pid()}-ghi"
    for folder in (killed, running, elsewhere):
        write_cache(folder)
    once.build_once(path, write_cache)
    assert not killed.exists() and running.exists() and elsewhere.exists()


def test_build_hub_waits_for_local_rank_0(tmp_path, monkeypatch):
    """A helper process of a launch does not tokenize: it loads what local rank 0 cached."""
    lines = [" = Title = \n", "", " a well @-@ known town , he said . \n"] * 4
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"text": lines}))
    built = build_data({"name": "wikitext2", "cache_dir": str(tmp_path / "rank0"), "num_proc": 1}, 8)

    def no_network(*args, **kwargs):
        raise AssertionError("a helper process tokenized")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    helper(monkeypatch)
    source, staging, target = tmp_path / "rank0", tmp_path / "staging", tmp_path / "shared"
    shutil.copytree(source, staging)
    thread = later(0.3, lambda: os.replace(staging, target))  # rank 0's cache appears, whole
    waited = build_data({"name": "wikitext2", "cache_dir": str(target), "num_proc": 1}, 8)
    thread.join()
    assert waited.train.with_format(None)["input_ids"] == built.train.with_format(None)["input_ids"]


def test_two_processes_of_one_launch_build_once(tmp_path):
    """Real processes, as torchrun starts them: the same parent, LOCAL_RANK 0 and 1. The build
    finishes only once the helper says it waits, so the helper's wait is exercised every time."""
    script = (
        "import sys, time\nfrom pathlib import Path\nfrom mdlm_dmmd.data import once\nonce.POLL_SECONDS = 0.05\n"
        "def build(tmp):\n    while not Path(sys.argv[3]).exists():\n        time.sleep(0.05)\n"
        "    (tmp / 'built_by').write_text(sys.argv[1])\n"
        "once.build_once(Path(sys.argv[2]), build)\nprint(Path(sys.argv[2], 'built_by').read_text())\n")
    path, go = tmp_path / "owt_1024_train", tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "SLURM_LOCALID")}

    def start(rank):
        return subprocess.Popen([sys.executable, "-c", script, f"rank {rank}", str(path), str(go)],
                                env={**env, "LOCAL_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    helper, builder = start(1), start(0)
    said = ""
    while "waiting" not in said and (line := helper.stderr.readline()):  # until the helper waits (or ends)
        said += line
    go.touch()
    out, err = helper.communicate(timeout=60)
    built, built_err = builder.communicate(timeout=60)
    assert "waiting for the process with local rank 0" in said, said + err
    assert builder.returncode == helper.returncode == 0, (built_err, err)
    assert built.strip() == out.strip() == "rank 0"
