"""Files that appear whole or not at all: caches and checkpoints that a crash, a failed write or
a concurrent reader (another rank, another machine on a shared folder) must never see half of."""

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary name beside `path` to write to; rename it onto `path` when the block
    ends, or remove it when the block raises.

    The rename is atomic within a filesystem, so readers see the old file or the new one. The
    name is unique per process and call, so concurrent writers never share one (the last rename
    wins, with a whole file); it starts with a dot, so globs over the folder skip it, and keeps
    `path`'s suffix, which some writers append otherwise (`np.savez` adds `.npz`). It is not
    created here: the writer creates it with the usual permissions.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
