"""The output lifecycle of every step: refuse bad outputs, write into ``<output>.partial`` under the output's lock
(:mod:`l2l_scale.io.lock`) and rename it when complete, and check that a resumed run repeats the first one.

The completion records of the blocks written meanwhile live in ``<output>.partial/.l2l-progress``
(:mod:`l2l_scale.io.journal`, :mod:`l2l_scale.io.blockwrite`) and go away with the final rename.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from l2l_scale.errors import OutputError
from l2l_scale.io import lock
from l2l_scale.io.atomic import write_json
from l2l_scale.io.prov import jsonable

PARTIAL_SUFFIX = ".partial"
PROGRESS_DIR = ".l2l-progress"


def check_run(progress: Path, run: dict, output: Path, resume: bool) -> None:
    """Record a run's options in ``progress/run.json``; resuming with other options is refused.

    A resumed run finishes the blocks of the first one, so both must compute the same thing.
    """
    run_file = progress / "run.json"
    if resume and run_file.exists():
        previous = json.loads(run_file.read_text())
        changed = sorted(k for k in set(run) | set(previous) if previous.get(k) != run.get(k))
        if changed:
            raise OutputError(f"{output}: the unfinished run used different {', '.join(changed)}; rerun with the same "
                              "options, or with --overwrite to start again")
    progress.mkdir(parents=True, exist_ok=True)
    write_json(run_file, jsonable(run))


def partial_path(path: Path) -> Path:
    """The temporary sibling an output is written to before the final rename."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


def check_output(path: str | Path, *, overwrite: bool = False, inputs: Sequence[str | Path] = ()) -> Path:
    """Refuse an output that exists (without ``overwrite``), equals or contains an input, or is not writable."""
    path = Path(path)
    resolved = path.resolve()
    for inp in inputs:
        ir = Path(inp).resolve()
        if resolved == ir or ir in resolved.parents or resolved in ir.parents:
            raise OutputError(f"{path}: output overlaps the input {inp}; choose an output path outside the input")
    lock.check_unlocked(path)  # before "exists": a run in progress explains a partial output better
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: output exists; pass --overwrite to replace it or choose another path")
    parent = resolved.parent
    if not parent.exists():
        raise OutputError(f"{parent}: output folder does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{parent}: output folder is not writable; choose a writable location")
    return path


@contextmanager
def atomic_output(path: str | Path, *, overwrite: bool = False, resume: bool = False,
                  inputs: Sequence[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``path`` only when the block succeeds.

    On failure the temporary directory is removed, unless ``resume`` is set: then it is kept so that a rerun
    with ``--resume`` finishes only the missing blocks. An existing ``path`` is replaced only after the new
    output is complete. The whole block holds ``<path>.lock`` (:mod:`l2l_scale.io.lock`): a second run writing
    the same output is refused with a message naming the first, and a crashed run's lock is detected as stale.
    """
    path = check_output(path, overwrite=overwrite, inputs=inputs)
    # Held from before the partial directory is touched until after the final rename, so a second run can
    # neither delete (--overwrite) nor resume a partial output that a live run is still writing.
    with lock.OutputLock(path):
        tmp = partial_path(path)
        if tmp.exists() and not resume:
            if not overwrite:
                raise OutputError(f"{tmp} holds an interrupted run; pass --resume to finish it or --overwrite to "
                                  "start again")
            shutil.rmtree(tmp)
        try:
            tmp.mkdir(exist_ok=resume)
        except OSError as exc:
            raise OutputError(f"{tmp}: cannot create output ({exc.strerror}); check free space and "
                              "permissions") from None
        try:
            yield tmp
            shutil.rmtree(tmp / PROGRESS_DIR, ignore_errors=True)
            old = path.with_name(path.name + ".replaced")
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException as exc:
            if not resume:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
                raise OutputError(f"{path}: writing failed ({exc.strerror or exc}); check free space and "
                                  "permissions") from exc
            raise
