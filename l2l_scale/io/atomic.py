"""Whole-file writes that readers never see half done, and the one status printer of every step."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``.

    The temporary name is unique per call, so concurrent writers (threads, Dask workers) never share one, and a
    rename within one folder is atomic on POSIX filesystems: a reader sees the old file or the new one, never a
    mix. The temporary file is removed if ``write`` fails.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, allow_nan: bool = True,
               default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`atomic_write`); returns ``path``."""
    text = json.dumps(obj, indent=indent, allow_nan=allow_nan, default=default)
    return atomic_write(path, lambda p: p.write_text(text + "\n", encoding="utf-8"))


def say(msg: str) -> None:
    """One status line on stderr, flushed at once (stdout stays free for results such as JSON)."""
    print(msg, file=sys.stderr, flush=True)
