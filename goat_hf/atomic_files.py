"""Durable atomic writes for adapter folders: a reader finds the old file or the new one, never half of one.

Each file is written to a temporary name in the same folder, flushed to the disk (fsync), renamed over the
target, and the folder entry is flushed too. The temporary file is created with mode 0o666 minus the umask, as
`open()` would, so a serving process or another user reads a saved adapter as it reads the folder's other files.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

TMP_SUFFIX = ".tmp"
DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` by `data` in one rename; a full disk raises an OSError that says so."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)  # the bytes are on the disk before the name points at them
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            raise OSError(
                error.errno,
                f"No space left on the device while writing {path} ({len(data):,} bytes): free some space and save "
                f"again. {path.name} still holds what it held before this save.",
            ) from error
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Flush the folder's entries (the rename) to the disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def remove_orphans(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files a killed save of `names` left in `folder`; returns what was removed."""
    removed = []
    for name in names:
        for orphan in folder.glob(f".{name}.*{TMP_SUFFIX}"):
            orphan.unlink(missing_ok=True)
            removed.append(orphan)
    return removed
