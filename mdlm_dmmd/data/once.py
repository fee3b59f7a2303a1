"""A data cache built by one process per machine, however many a launcher starts.

torchrun and SLURM start every process at once, and each builds its data before Lightning joins
them. Tokenizing OpenWebText takes hours: without this, every process would tokenize it again
and the last to finish would find the folder taken. Here the process with local rank 0 builds
the cache (into a temporary name, renamed when complete) and the others wait for it to appear.
Processes that Lightning starts itself (`trainer.strategy=ddp` on one machine) begin after rank
0 has built its data, so they find the cache and never wait.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from mdlm_dmmd.errors import UserError

POLL_SECONDS = 10.0  # how often a waiting process looks for the cache


def local_rank() -> int:
    """This process's rank on its machine: torchrun's LOCAL_RANK, SLURM's SLURM_LOCALID, else 0."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def failure_marker(path: Path) -> Path:
    return path.with_name(f"{path.name}.failed")


def build_once(path: Path, build: Callable[[Path], None]) -> None:
    """Make `path` with `build(tmp)` (which writes a complete copy at `tmp`) unless it exists:
    in the process with local rank 0; any other process waits until `path` appears, or fails
    with rank 0's error."""
    if path.exists():
        return
    if local_rank() != 0:
        wait_for(path)
        return
    marker = failure_marker(path)
    marker.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        build(tmp)
    except BaseException as err:  # tell the waiting processes, then fail as usual
        marker.write_text(f"{type(err).__name__}: {err}")
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, path)  # a complete cache or none: an interrupted build leaves only tmp
    except OSError:
        if not path.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another machine sharing the folder was first


def wait_for(path: Path) -> None:
    """Until `path` exists; a failure marker that local rank 0 wrote after this wait began ends
    the wait with its error."""
    started = time.time()
    print(f"waiting for the process with local rank 0 to build the data cache at {path}", file=sys.stderr, flush=True)
    marker = failure_marker(path)
    while not path.exists():
        if marker.exists() and marker.stat().st_mtime >= started - 1:
            raise UserError(f"the process with local rank 0 failed to build the data cache at {path}: "
                            f"{marker.read_text()}")
        time.sleep(POLL_SECONDS)
