"""Files that appear whole or not at all: caches and checkpoints that an interrupted or failed
write, or a concurrent reader (another rank, another machine on a shared folder), must never see
half of."""

import contextlib
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary name beside `path` to write to; rename it onto `path` when the block
    ends, or remove it when the block raises (the block's error is what propagates).

    The rename is atomic within a filesystem, so readers see the old file or the new one. Nothing
    is fsynced: this covers a killed or failing process, not a power loss. The name is unique per
    process and call, so concurrent writers never share one (the last rename wins, with a whole
    file); it starts with a dot (hidden from `ls` and `glob.glob`, though not from `Path.glob`)
    and keeps `path`'s suffix, which some writers append otherwise (`np.savez` adds `.npz`). It
    is not created here: the writer creates it with its usual permissions.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


_TEMPORARY = re.compile(r"\..+\.\d+-[0-9a-f]{8}\.tmp(\.[^.]*)?", re.DOTALL)


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether `path` is named as `atomic_write`'s temporaries are: one that a killed writer left
    behind, for code that reads a whole folder (a teacher directory's content hash) to skip."""
    return _TEMPORARY.fullmatch(Path(path).name) is not None
