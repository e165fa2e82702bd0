"""
The one way this project writes a file that something else reads (a checkpoint, its
`last_checkpoint` tag, a converted checkpoint, a generated dataset's JSON): in full or not at
all. Imports only the standard library.
"""
import errno
import os
import shutil
import tempfile
from typing import IO, Callable

__all__ = ["atomic_write"]


def atomic_write(path: str, write: Callable[[IO[bytes]], None], *, shared: bool = False) -> None:
    """
    Call `write` on a binary file that becomes `path` only once complete: a temporary file in
    the same folder, flushed to disk, then renamed onto `path` (atomic on POSIX). On any failure
    the temporary file is removed and `path` is as it was; a full disk (or quota) raises an
    OSError that says so, with what was written and what is free.

    The temporary file is ``path + ".tmp"`` (what a writer killed mid-write leaves; the next
    write replaces it), or with `shared` (other processes may write `path` at the same time, as
    DDP workers generating one dataset) a ``.<name>.*.tmp`` unique to the call.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if shared:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    else:
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(folder).free
            raise OSError(
                e.errno,
                f"Cannot write '{path}': no space left on its disk (or quota) after "
                f"{written / 2**20:.1f} MiB; {free / 2**20:.1f} MiB are free in '{folder}'. "
                f"'{path}' and the files written before are as they were (the partial file is "
                "removed). Free space, or give another OUTPUT_DIR, then go on with --resume.",
            ) from e
        raise
