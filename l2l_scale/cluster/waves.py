"""Running task lists on the active client (or dask's local scheduler) with a progress bar: one list at a time
(:func:`compute_with_progress`), or the tasks of many images in waves (:func:`compute_waves`)."""

from __future__ import annotations

from typing import Any, Iterable, Sequence


def current_client() -> Any:
    """The active distributed client, or ``None``."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def compute_with_progress(tasks: Sequence[Any], label: str, *, resources: dict | None = None) -> list:
    """Compute dask collections/delayed objects with a progress bar; return their results in order.

    Uses the active distributed client if there is one (tasks then show on its dashboard), else dask's local
    scheduler. ``resources`` (e.g. ``{"GPU": 1}``) is passed to the scheduler for placement.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    client = current_client()
    with Progress(*columns, transient=False, redirect_stdout=False) as bar:
        job = bar.add_task(label, total=len(tasks))
        if client is not None:
            from distributed import as_completed

            futures = client.compute(list(tasks), resources=resources)
            index = {f.key: i for i, f in enumerate(futures)}
            results: list = [None] * len(futures)
            try:
                for fut in as_completed(futures):
                    results[index[fut.key]] = fut.result()
                    bar.advance(job)
            except BaseException:
                client.cancel(futures)
                _wait_for_cancelled(client, tasks)
                raise
            return results
        final = {k for k in (getattr(t, "key", None) for t in tasks) if k is not None}
        return _local_compute(tasks, lambda key: bar.advance(job) if key in final else None)


def _local_compute(tasks: Sequence[Any], on_done: Any) -> list:
    """``dask.compute(*tasks)`` on the local scheduler, calling ``on_done(key)`` after every task."""
    import dask
    import dask.threaded
    from dask.base import get_scheduler
    from dask.callbacks import Callback

    class _Done(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            on_done(key)

    # dask's threaded scheduler raises the first error while the other threads still run their tasks; with
    # a pool of our own, shutting it down waits for them, so a failed write is not followed by late chunks
    # that recreate the output the caller has just removed.
    own_pool = (get_scheduler(collections=list(tasks)) is dask.threaded.get
                and dask.config.get("pool", None) is None)
    pool = dask.threaded.ContextAwareThreadPoolExecutor(dask.config.get("num_workers", None) or
                                                        dask.threaded.CPU_COUNT) if own_pool else None
    try:
        with _Done():
            return list(dask.compute(*tasks, **({"pool": pool} if pool else {})))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


WAVE_TASKS = 20000  # tasks per submission: a 100k-block plate never has its whole graph on the client


def compute_waves(units: Iterable[Sequence[Any]], label: str, *, n_units: int, unit_name: str = "fields",
                  resources: dict | None = None) -> int:
    """Compute the tasks of many units (the fields of a plate, the images of a folder) as one run.

    ``units`` yields, per unit, the list of its dask collections, or ``(n, tasks)`` for ``n`` units that share
    tasks (fields whose small blocks are predicted together); it is consumed lazily, in waves of about
    :data:`WAVE_TASKS` tasks. With a distributed client the first wave is only large enough to occupy every
    worker thread twice, and waves double from there: the workers start on the first fields while the client
    still plans (creates the output groups of) the rest, instead of idling until a whole wave is planned (0.5 s
    for a plate of 256 fields). Further waves are planned and submitted while fewer than half a wave is in
    flight, so workers never idle between fields, and the client holds the task descriptions of at most about
    two waves. One progress bar counts tasks, units finished, the ETA and
    the dashboard URL. On failure, tasks still running are waited for (see :func:`compute_with_progress`).

    Returns
    -------
    int
        The number of tasks computed.
    """
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    client = current_client()
    it = iter(units)
    owner: dict = {}  # task key -> unit index
    remaining: list[int] = []
    state = {"units_done": 0, "tasks": 0}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[units]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
               TextColumn("{task.fields[dash]}"))
    dash = f"dashboard {client.dashboard_link}" if client is not None else ""

    with Progress(*columns, transient=False, redirect_stdout=False) as bar:
        job = bar.add_task(label, total=0, units=f"0/{n_units} {unit_name}", dash=dash)

        weights: list[int] = []

        def unit_finished(u: int) -> None:
            state["units_done"] += weights[u]
            bar.update(job, units=f"{state['units_done']}/{n_units} {unit_name}")

        def next_wave(limit: int = WAVE_TASKS) -> list:
            wave: list = []
            for tasks in it:
                n, tasks = tasks if isinstance(tasks, tuple) else (1, tasks)
                u = len(remaining)
                remaining.append(len(tasks))
                weights.append(n)
                if not tasks:
                    unit_finished(u)
                for t in tasks:
                    owner[t.key] = u
                wave.extend(tasks)
                if len(wave) >= limit:
                    break
            state["tasks"] += len(wave)
            bar.update(job, total=state["tasks"])
            return wave

        def task_done(key: Any) -> None:
            u = owner.pop(key, None)
            if u is None:
                return
            bar.advance(job)
            remaining[u] -= 1
            if not remaining[u]:
                unit_finished(u)

        if client is None:
            while wave := next_wave():
                _local_compute(wave, task_done)
            return state["tasks"]

        from distributed import as_completed

        live: set = set()
        ac = as_completed()

        plan = {"more": True, "size": max(2, 2 * sum(client.nthreads().values()))}

        def top_up() -> None:
            while plan["more"] and ac.count() < WAVE_TASKS // 2:
                wave = next_wave(plan["size"])
                plan["size"] = min(2 * plan["size"], WAVE_TASKS)
                if wave:
                    futures = client.compute(wave, resources=resources)
                    live.update(futures)
                    ac.update(futures)
                plan["more"] = bool(wave)

        try:
            top_up()
            for fut in ac:
                fut.result()
                live.discard(fut)
                task_done(fut.key)
                top_up()
        except BaseException:
            keys = {str(f.key) for f in live}
            client.cancel(list(live))
            _wait_for_keys(client, keys)
            raise
    return state["tasks"]


def _executing_keys(dask_worker: Any) -> list[str]:
    return [str(ts.key) for ts in dask_worker.state.executing]


def _wait_for_cancelled(client: Any, tasks: Sequence[Any], timeout: float = 300.0) -> None:
    """Wait until no worker still runs a task of ``tasks``' graphs (at most ``timeout`` seconds).

    Cancelling only stops tasks that have not started: one already running keeps running on its worker after the
    scheduler has forgotten it, and a block write finishing after the caller removed a failed output would leave
    a partial directory behind.
    """
    from dask.base import collections_to_expr

    # The same optimised graph that client.compute submitted, so its keys are the ones the workers run.
    _wait_for_keys(client, {str(k) for k in collections_to_expr(list(tasks), optimize_graph=True).__dask_graph__()},
                   timeout)


def _wait_for_keys(client: Any, keys: set[str], timeout: float = 300.0) -> None:
    """Wait until no worker still runs a task whose key is in ``keys`` (at most ``timeout`` seconds)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            running = client.run(_executing_keys)
        except Exception:  # a worker gone or unreachable runs nothing more for us
            return
        if not any(keys.intersection(k) for k in running.values()):
            return
        time.sleep(0.1)
