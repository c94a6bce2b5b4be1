"""Write output files all-or-nothing: a failed command never leaves a partial file behind."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import IO

from isa.diag import CimcError


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **open_args: object) -> Iterator[IO]:
    """Open a temporary file beside `path` (usual permissions, umask applied); when the block
    ends normally it is flushed, synced and renamed over `path`. On any failure it is removed and
    an existing `path` is left untouched; OS errors become `cannot write PATH: reason`.

    A symbolic link is followed (its target is replaced, not the link); a path that is not a
    regular file (a device such as /dev/stdout, a FIFO) is written in place, since it cannot be
    replaced."""
    name = os.fspath(path)
    try:
        real = os.path.realpath(name)
        try:
            special = not stat.S_ISREG(os.stat(real).st_mode)
        except FileNotFoundError:
            special = False
        if special:
            with open(real, mode, **open_args) as f:  # type: ignore[call-overload]
                yield f
            return
        directory, base = os.path.split(real)
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, mode, **open_args) as f:  # type: ignore[call-overload]
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, real)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    except OSError as e:
        raise CimcError(f"cannot write {name}: {e.strerror or e}") from e
