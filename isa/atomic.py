"""Write output files all-or-nothing: a failed command never leaves a partial file behind."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from isa.diag import CimcError


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **open_args: object) -> Iterator[IO]:
    """Open a temporary file beside `path` (usual permissions, umask applied); when the block
    ends normally it is flushed, synced and renamed over `path`. On any failure it is removed and
    an existing `path` is left untouched; OS errors become `cannot write PATH: reason`."""
    path = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise CimcError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, mode, **open_args) as f:  # type: ignore[call-overload]
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise CimcError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
