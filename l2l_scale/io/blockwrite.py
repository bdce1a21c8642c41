"""The write tasks of an image as one piece of a run's graph: level-0 blocks, pyramid levels, finishing.

Every step that writes images (predict, convert, register, baselines, ``write_image``/``write_plate``) builds
its tasks here, so all blocks of all fields and all their pyramid levels can be submitted together
(:func:`l2l_scale.cluster.compute_waves`) and workers never idle between fields or levels.

- A level-0 task writes one block (whole zarr chunks, so no two tasks touch a chunk and no lock is needed).
- A pyramid task writes one chunk of level ``L+1`` (all channels) as the 2x mean of level ``L`` read back from
  disk, and depends only on the level-``L`` tasks covering its region: the expensive level-0 graph runs once,
  and each task needs a few chunks of memory.
- The finishing task (omero display windows from the top level) depends on every task of its image.

Completion records go to :mod:`l2l_scale.io.journal` after each block's data is written; with records, tasks
already recorded are not built at all (a resumed run computes only what is missing).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import dask.array as da
import numpy as np
import zarr
from dask import delayed

from l2l_scale.io import journal
from l2l_scale.io.chunks import cached_array

RECORDS = "journal"  # folder of the completion records inside a run's progress folder


def recorded(progress: str | Path, level: str | None = None) -> set[str]:
    """The blocks recorded as written in a run's progress folder (only those of pyramid ``level``, if given)."""
    keys = journal.finished(Path(progress) / RECORDS)
    return keys if level is None else {k for k in keys if k.rsplit(":", 2)[-2] == level}


class BlockWriter:
    """The completion records of one run, and the tasks of its images.

    Parameters
    ----------
    progress : path, optional
        The run's progress folder (``<output>.partial/.l2l-progress``); ``None`` writes no records.
    """

    def __init__(self, progress: Path | None):
        self.folder = str(Path(progress) / RECORDS) if progress is not None else None
        self.done = journal.finished(self.folder) if self.folder else set()
        self.total = 0  # level-0 blocks seen, done or not
        self.pending = 0  # level-0 blocks with a task

    def image(self, unit: str, group: str | Path, plans: Sequence[Any], dims: Sequence[str],
              channel_names: Sequence[str], attrs_extra: dict | None = None) -> "ImageTasks":
        """Start the tasks of one image group (``unit`` names it in the records, e.g. its plate key)."""
        return ImageTasks(self, unit or "image", str(group), plans, tuple(dims), list(channel_names), attrs_extra)


class ImageTasks:
    """The tasks of one image; add level-0 blocks, then call :meth:`tasks` for the whole list."""

    def __init__(self, writer: BlockWriter, unit: str, group: str, plans, dims, channel_names, attrs_extra):
        self.writer, self.unit, self.group, self.plans, self.dims = writer, unit, group, plans, dims
        self.channel_names, self.attrs_extra = channel_names, attrs_extra
        self.plane_axes = [i for i, d in enumerate(dims) if d not in ("c", "y", "x")]
        self.yx = (dims.index("y"), dims.index("x"))
        self.by_level: list[dict[tuple, list]] = [{} for _ in plans]
        self.finished_in_task = False  # see finish_in_block_task

    def finish_in_block_task(self) -> tuple | None:
        """The arguments of :func:`finish_block` for the task that writes this image's only block, or None.

        An image of one pyramid level and one block (the fields of a plate of small images) is finished by its
        block's task right after the write: a separate finishing task per field cost the scheduler more than
        the finishing itself. The caller must then run ``finish_block(*args)`` in that task.
        """
        level = self.plans[0]
        if len(self.plans) != 1 or math.prod(-(-n // c) for n, c in zip(level.shape, level.chunks)) != 1:
            return None
        self.finished_in_task = True
        return self.group, self.dims, self.channel_names, self.attrs_extra

    def _record(self, level: int, index: Sequence[int]) -> tuple[str, str] | None:
        if self.writer.folder is None:
            return None
        return self.writer.folder, f"{self.unit}:{self.plans[level].path}:{'.'.join(map(str, index))}"

    def _pending(self, record: tuple[str, str] | None) -> bool:
        return record is None or record[1] not in self.writer.done

    def add_block(self, plane: Sequence[int], by: int, bx: int, func: Callable, *args: Any) -> None:
        """Add ``func(*args, record)`` writing level-0 block ``(by, bx)`` of ``plane`` (t/z indices), unless done.

        ``func`` must call :func:`l2l_scale.io.journal.record` with ``record`` after its data is written.
        """
        record = self.block_record(plane, by, bx)
        if record is not False:
            self.add_task(plane, by, bx, delayed(func, pure=False)(*args, record))

    def block_record(self, plane: Sequence[int], by: int, bx: int) -> tuple[str, str] | None | bool:
        """The record the task writing level-0 block ``(by, bx)`` must write, or False if it is done already."""
        self.writer.total += 1
        record = self._record(0, (*plane, by, bx))
        if not self._pending(record):
            return False
        self.writer.pending += 1
        return record

    def add_task(self, plane: Sequence[int], by: int, bx: int, task: Any) -> None:
        """Register ``task`` as (one of) the writer(s) of level-0 block ``(by, bx)``; it may write others too."""
        self.by_level[0].setdefault((tuple(plane), by, bx), []).append(task)

    def add_array(self, arr: da.Array) -> None:
        """Add one task per chunk of level 0 writing ``arr`` (rechunked to the level's chunks), unless done."""
        target = zarr.open_array(store=self.group, path=self.plans[0].path, mode="r+")
        if tuple(arr.shape) != tuple(target.shape):
            raise ValueError(f"array shape {arr.shape} != target shape {target.shape}")
        arr = arr.rechunk(target.chunks)
        blocks = arr.to_delayed()
        starts = [np.cumsum((0,) + c[:-1]) for c in arr.chunks]
        for index in np.ndindex(*blocks.shape):
            self.writer.total += 1
            record = self._record(0, index)
            if not self._pending(record):
                continue
            self.writer.pending += 1
            region = tuple(slice(int(s[i]), int(s[i]) + c[i]) for s, c, i in zip(starts, arr.chunks, index))
            key = (tuple(index[a] for a in self.plane_axes), index[self.yx[0]], index[self.yx[1]])
            self.by_level[0].setdefault(key, []).append(
                delayed(write_block, pure=False)(blocks[index], target, region, record))

    def tasks(self) -> list:
        """Every task of the image: the level-0 blocks added, the pyramid levels above them, and finishing."""
        for level in range(1, len(self.plans)):
            self._pyramid_level(level)
        every = list({t.key: t for level in self.by_level for ts in level.values() for t in ts}.values())
        if self.finished_in_task and every:
            return every
        finish = delayed(finish_block, pure=False)(self.group, self.dims, self.channel_names, self.attrs_extra,
                                                   *every)
        return [*every, finish]

    def _pyramid_level(self, level: int) -> None:
        src, dst = self.plans[level - 1], self.plans[level]
        (ay, ax), below = self.yx, self.by_level[level - 1]
        sy, sx = src.chunks[ay], src.chunks[ax]
        cy, cx = dst.chunks[ay], dst.chunks[ax]
        planes = np.ndindex(*[dst.shape[a] for a in self.plane_axes])
        for plane in planes:
            for by in range(math.ceil(dst.shape[ay] / cy)):
                y0, y1 = by * cy, min((by + 1) * cy, dst.shape[ay])
                for bx in range(math.ceil(dst.shape[ax] / cx)):
                    x0, x1 = bx * cx, min((bx + 1) * cx, dst.shape[ax])
                    record = self._record(level, (*plane, by, bx))
                    if not self._pending(record):
                        continue
                    deps = [t for i in range(2 * y0 // sy, math.ceil(2 * y1 / sy))
                            for j in range(2 * x0 // sx, math.ceil(2 * x1 / sx))
                            for t in below.get((tuple(plane), i, j), ())]
                    region = self._region(plane, (y0, y1), (x0, x1))
                    self.by_level[level][(tuple(plane), by, bx)] = [delayed(pyramid_block, pure=False)(
                        self.group, src.path, dst.path, self.dims, region, record, *deps)]

    def _region(self, plane: Sequence[int], ys: tuple[int, int], xs: tuple[int, int]) -> tuple[slice, ...]:
        region = [slice(None)] * len(self.dims)
        for a, p in zip(self.plane_axes, plane):
            region[a] = slice(int(p), int(p) + 1)
        region[self.yx[0]], region[self.yx[1]] = slice(*ys), slice(*xs)
        return tuple(region)


def write_block(block: np.ndarray, target: zarr.Array, region: tuple[slice, ...],
                record: tuple[str, str] | None) -> int:
    """Write one block, then record it (a crash between the two recomputes the block)."""
    target[region] = block
    if record is not None:
        journal.record(*record)
    return 1


def downsample(block: np.ndarray, dims: Sequence[str]) -> np.ndarray:
    """The 2x mean in y/x (odd edge pixels trimmed), rounded and clipped back into integer dtypes."""
    work = block.astype(np.float64) if block.dtype.kind != "f" else block
    # The four phases summed as (a + b) + (c + d), numpy's own pairwise order for a mean of four, so the result
    # equals dask's coarsen(np.mean, ...) bit for bit; coarsen's reduction over two short strided axes took
    # 0.10 s for 4096^2 float32 against 0.023 s here (2 % of a bf16 predict's wall time).
    ay, ax = dims.index("y"), dims.index("x")
    h, w = work.shape[ay] // 2 * 2, work.shape[ax] // 2 * 2

    def phase(oy: int, ox: int) -> np.ndarray:
        index = [slice(None)] * work.ndim
        index[ay], index[ax] = slice(oy, h, 2), slice(ox, w, 2)
        return work[tuple(index)]

    down = ((phase(0, 0) + phase(0, 1)) + (phase(1, 0) + phase(1, 1))) * np.asarray(0.25, work.dtype)
    if block.dtype.kind in "ui":
        info = np.iinfo(block.dtype)
        down = np.clip(np.round(down), info.min, info.max)
    return down.astype(block.dtype)


def pyramid_block(group: str, src: str, dst: str, dims: Sequence[str], region: tuple[slice, ...],
                  record: tuple[str, str] | None, *deps: Any) -> int:
    """Write ``region`` of level ``dst`` as the 2x mean of level ``src`` on disk (``deps``: its writers)."""
    source = cached_array(group, src, "r")
    wide = tuple(slice(2 * r.start, 2 * r.stop) if d in ("y", "x") else r for r, d in zip(region, dims))
    target = cached_array(group, dst, "r+")
    target[region] = downsample(source[wide], dims)
    if record is not None:
        journal.record(*record)
    return 1


def finish_block(group: str, dims: Sequence[str], channel_names: Sequence[str], attrs_extra: dict | None,
                 *deps: Any, top: np.ndarray | None = None) -> int:
    """Set the image's display windows once every level is written (``deps``: all its write tasks).

    The group document is read and rewritten as JSON on a local filesystem (a few hundred microseconds,
    against several milliseconds through zarr's group API, per field of a plate). ``top``: the top level's
    data, where the caller has just written all of it (else it is read back).
    """
    from l2l_scale.io.write import display_windows, finish_image_group, omero_metadata

    doc_path = Path(group) / "zarr.json"
    try:
        doc = json.loads(doc_path.read_bytes())
        ome = dict(doc["attributes"]["ome"])
    except (OSError, ValueError, KeyError, TypeError):
        g = zarr.open_group(group, mode="r+")
        finish_image_group(g, dims, channel_names)
        if attrs_extra:
            g.attrs.update(attrs_extra)
        return 1
    if channel_names:
        if top is None:
            top = cached_array(group, ome["multiscales"][0]["datasets"][-1]["path"], "r")[...]
        ome["omero"] = omero_metadata(channel_names, display_windows(top, dims))
    doc["attributes"] = {**doc["attributes"], "ome": ome, **(attrs_extra or {})}
    tmp = doc_path.with_name(f"zarr.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc))  # unindented, as create_image_group writes it (json's C encoder)
    os.replace(tmp, doc_path)  # readers never see half a document
    return 1
