"""Completion records of block-writing steps: one append-only journal file per writing process.

Why a journal, and not the alternatives
---------------------------------------
- One marker file per block (what l2l-scale did before) turns a terabyte plate into 100k tiny files, which
  parallel filesystems (Lustre, GPFS, NFS) handle badly: every create is a metadata-server round trip.
- zarr chunk existence is not a completion record: a chunk can be half-written when a process dies (zarr's
  LocalStore writes in place), a block may span several chunks, and an all-fill-value chunk may not be
  written at all.
- A per-image zarr array of block flags has one writer per block but one chunk for many blocks: concurrent
  read-modify-write of that chunk by several workers loses updates, unless every flag is its own chunk, which
  is one file per block again.

A journal has exactly one writer per file (the process that wrote the blocks, named by host and pid), so
appending needs no lock across processes, not even on NFS where ``O_APPEND`` is not atomic between clients.
A record is appended only after the block's data has been written, so a process killed between the two just
recomputes that block. Every line carries a CRC32 of its key: a line torn by a crash (or the zeros some
filesystems leave after a power loss) fails the check and counts as not done. The files, O(workers) per run
and O(1) per image, live in the output's progress folder and are removed with it when the output is complete.
Each record opens and closes the file (microseconds next to a block's compute): an open file removed with the
progress folder would leave ``.nfs*`` placeholders behind on NFS.
"""

from __future__ import annotations

import os
import socket
import threading
import zlib
from pathlib import Path

_SUFFIX = ".log"
_LOCK = threading.Lock()


def _line(key: str) -> bytes:
    if "\n" in key or "\t" in key:
        raise ValueError(f"journal key {key!r} must not contain tabs or newlines")
    return f"{key}\t{zlib.crc32(key.encode()):08x}\n".encode()


def record(folder: str | Path, key: str) -> None:
    """Append ``key`` to this process's journal in ``folder`` (call it after the block's data is written)."""
    folder = Path(folder)
    name = f"{socket.gethostname()}-{os.getpid()}{_SUFFIX}"
    data = _line(key)
    with _LOCK:  # threads of one process share its file; one os.write per record keeps lines whole
        try:
            fd = os.open(folder / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except FileNotFoundError:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def finished(folder: str | Path) -> set[str]:
    """Every key recorded in ``folder`` by any process (lines failing their checksum are ignored)."""
    folder = Path(folder)
    done: set[str] = set()
    if not folder.is_dir():
        return done
    for path in folder.glob(f"*{_SUFFIX}"):
        for raw in path.read_bytes().split(b"\n")[:-1]:  # the part after the last newline is incomplete
            key, _, crc = raw.decode("utf-8", "replace").rpartition("\t")
            if key and crc == f"{zlib.crc32(key.encode()):08x}":
                done.add(key)
    return done
