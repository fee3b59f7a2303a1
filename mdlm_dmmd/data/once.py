"""A data cache built by one process per machine, however many a launcher starts.

torchrun and SLURM start every process at once, and each builds its data before Lightning joins
them. Tokenizing OpenWebText takes hours: without this, every process would tokenize it again
and the last to finish would find the folder taken. Here the process with local rank 0 builds
the cache (into a temporary folder, renamed when complete) and the others on its machine wait
for it to appear. Processes that Lightning starts itself (`trainer.strategy=ddp` on one machine)
begin after rank 0 has built its data, so they find the cache and never wait.

The builder leaves two notes beside the cache, named with its machine and read only by processes
of the same launch (`launch_id`): `<cache>.building-<host>` (its pid: a waiter fails instead of
waiting for a builder that was killed) and `<cache>.failed-<host>` (its error: the waiters fail
with it, whenever they start waiting).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.ranks import local_rank

POLL_SECONDS = 10.0  # how often a waiting process looks for the cache


def launch_id() -> str:
    """The same in every process that one launch started on this machine, and in no other: the
    SLURM job step, else the parent process (torchrun's agent) and, under torchrun, its restart
    count (a restarted group has the same agent, and must not read the notes of the attempt
    before it: a `failed` note or a `building` note of a dead builder)."""
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_STEP_ID"):
        return f"slurm {os.environ['SLURM_JOB_ID']}.{os.environ['SLURM_STEP_ID']}"
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    return f"parent {os.getppid()}" + (f" restart {restart}" if restart is not None else "")


def note(path: Path, kind: str) -> Path:
    """`<cache>.<kind>-<host>`: kind is "building" or "failed"."""
    return path.with_name(f"{path.name}.{kind}-{socket.gethostname()}")


def build_once(path: Path, build: Callable[[Path], None]) -> None:
    """Make `path` with `build(tmp)` (which writes a complete copy into the empty folder `tmp`)
    unless it exists: in the process with local rank 0; any other process waits until `path`
    appears, or fails with rank 0's error or when rank 0 is gone."""
    if path.exists():
        return
    if local_rank() != 0:
        wait_for(path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    note(path, "failed").unlink(missing_ok=True)
    remove_dead_builds(path)
    building = note(path, "building")
    building.write_text(f"{launch_id()}\n{os.getpid()}")
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-"))
    try:
        build(tmp)
        try:
            os.replace(tmp, path)  # a complete cache or none: an interrupted build leaves only tmp
        except OSError:
            if not path.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another machine sharing the folder was first
    except BaseException as err:  # tell the waiting processes, then fail as usual
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            note(path, "failed").write_text(f"{launch_id()}\n{type(err).__name__}: {err}")
        except OSError:
            pass  # the folder may be why the build failed; the error below is the one to see
        raise
    finally:
        building.unlink(missing_ok=True)


def remove_dead_builds(path: Path) -> None:
    """Temporary folders that this machine's earlier builds left when they were killed."""
    prefix = f"{path.name}.tmp-{socket.gethostname()}-"
    for folder in path.parent.glob(f"{prefix}*"):
        pid = folder.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def read_note(note_path: Path) -> str | None:
    """A note's text after its first line, if this launch wrote it; else None."""
    try:
        launch, _, text = note_path.read_text().partition("\n")
    except OSError:  # not there (or just removed)
        return None
    return text if launch == launch_id() else None


def wait_for(path: Path) -> None:
    """Until `path` exists; rank 0's failure note, or its building note naming a process that is
    gone, ends the wait with an error."""
    print(f"waiting for the process with local rank 0 to build the data cache at {path}", file=sys.stderr, flush=True)
    while not path.exists():
        failed = read_note(note(path, "failed"))
        if failed is not None:
            raise UserError(f"the process with local rank 0 failed to build the data cache at {path}: {failed}")
        builder = read_note(note(path, "building"))
        if builder is not None and builder.isdigit() and not alive(int(builder)) and not path.exists():
            raise UserError(f"the process with local rank 0 (pid {builder}) ended while building the data cache "
                            f"at {path}; run again")
        time.sleep(POLL_SECONDS)
