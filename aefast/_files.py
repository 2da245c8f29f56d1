"""Files written whole or not at all, and durably: checkpoints, evaluations, manifests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO


def replace_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Writes `path` through write(file) into a temporary file beside it, then renames
    that over `path`. A process killed mid-write leaves the previous file intact; the
    data and the rename are synced to the disk, in that order, so that a machine that
    loses power keeps the old file or the new one, never a truncated new one."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:  # the write failed or was interrupted: no half file beside the old one
        temporary.unlink(missing_ok=True)
        raise
    # The rename itself, in the folder's entry (POSIX): best effort, as some network and
    # shared-folder file systems refuse to sync a folder, and the new file is in place.
    with contextlib.suppress(OSError):
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def replace_text_atomically(path: str | os.PathLike, text: str) -> None:
    replace_atomically(path, lambda file: file.write(text.encode()))
