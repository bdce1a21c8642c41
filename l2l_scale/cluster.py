"""The one place that creates or connects Dask clusters, and runs task lists with progress.

Every command accepts the same cluster options (``--workers``, ``--threads-per-worker``, ``--memory-limit``,
``--scheduler``). The default is a LocalCluster of worker processes whose scheduler and dashboard listen on
127.0.0.1 only. ``--scheduler ADDRESS`` connects to an existing cluster; ``--scheduler threads`` runs in-process
with dask's threaded scheduler (no dashboard), for small jobs and debugging.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from l2l_scale.errors import ConfigError

DEFAULT_DASHBOARD = "127.0.0.1:8787"


class ClusterConfig(BaseModel):
    """How to get a Dask client.

    Attributes
    ----------
    kind : {"local", "address", "threads"}
        ``local`` starts a LocalCluster; ``address`` connects to ``address``; ``threads`` uses no cluster.
    workers, threads_per_worker : int, optional
        LocalCluster size; by default one single-threaded worker process per core.
    memory_limit : str
        Per-worker memory limit for LocalCluster (dask syntax, e.g. ``"4GB"``), ``"auto"`` by default.
    address : str, optional
        Scheduler address for ``kind="address"``.
    dashboard_address : str
        Where the LocalCluster dashboard listens; loopback only unless changed on purpose.
    resources : dict, optional
        Worker resources to advertise on a LocalCluster, e.g. ``{"GPU": 1}``.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "address", "threads"] = "local"
    workers: int | None = Field(default=None, ge=1)
    threads_per_worker: int | None = Field(default=None, ge=1)
    memory_limit: str = "auto"
    address: str | None = None
    dashboard_address: str = DEFAULT_DASHBOARD
    resources: dict[str, float] | None = None

    @field_validator("memory_limit")
    @classmethod
    def _check_memory(cls, v: str) -> str:
        from dask.utils import parse_bytes

        if v not in ("auto", "0") and v is not None:
            try:
                parse_bytes(v)
            except (ValueError, TypeError):
                raise ValueError(f"memory limit {v!r} is not a size like '4GB' or 'auto'") from None
        return v


def config_from_options(workers: int | None = None, threads_per_worker: int | None = None,
                        memory_limit: str | None = None, scheduler: str | None = None, *,
                        model_step: bool = False) -> ClusterConfig:
    """Turn the shorthand CLI flags into a :class:`ClusterConfig`.

    ``model_step`` changes the LocalCluster default to one worker process with a thread per core: a TensorFlow
    model then exists once (its memory is counted once, and its thread pool uses every core) while the other
    thread reads and writes blocks. GPU clusters use one worker per GPU instead (see :mod:`l2l_scale.cluster`).
    """
    if model_step and workers is None and threads_per_worker is None:
        workers, threads_per_worker = 1, os.cpu_count() or 1
    try:
        if scheduler and scheduler != "threads":
            return ClusterConfig(kind="address", address=scheduler)
        return ClusterConfig(kind="threads" if scheduler == "threads" else "local", workers=workers,
                             threads_per_worker=threads_per_worker, memory_limit=memory_limit or "auto")
    except ValueError as exc:
        raise ConfigError(f"invalid cluster option: {_first_error(exc)}") from None


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        e = errors()[0]
        loc = ".".join(str(p) for p in e.get("loc", ()))
        return f"{loc}: {e.get('msg')}" if loc else str(e.get("msg"))
    return str(exc)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def dask_client(config: ClusterConfig | None = None) -> Iterator[Any]:
    """Yield a connected ``distributed.Client`` (or ``None`` for ``kind="threads"``) and close it afterwards.

    The dashboard URL is printed as soon as the client exists.
    """
    config = config or ClusterConfig()
    if config.kind == "threads":
        yield None
        return
    from distributed import Client, LocalCluster

    if config.kind == "address":
        try:
            client = Client(config.address, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {config.address} ({exc}); "
                              "check the address and that the scheduler is running") from None
        cluster = None
    else:
        n_cores = os.cpu_count() or 1
        threads = config.threads_per_worker or 1
        workers = config.workers or max(1, n_cores // threads)
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=threads, processes=True, host="127.0.0.1",
            dashboard_address=config.dashboard_address, memory_limit=config.memory_limit,
            resources=config.resources, silence_logs=40,
        )
        client = Client(cluster)
    _say(f"Dask dashboard: {client.dashboard_link}")
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def current_client() -> Any:
    """The active distributed client, or ``None``."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def worker_resources(client: Any) -> dict[str, float]:
    """Total resources (e.g. GPU) advertised by the cluster's workers."""
    if client is None:
        return {}
    total: dict[str, float] = {}
    for w in client.scheduler_info(n_workers=-1)["workers"].values():
        for k, v in (w.get("resources") or {}).items():
            total[k] = total.get(k, 0) + v
    return total


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
                raise
            return results
        import dask
        from dask.callbacks import Callback

        final = set()

        class _Bar(Callback):
            def _start_state(self, dsk, state):
                final.update(k for k in (getattr(t, "key", None) for t in tasks) if k is not None)

            def _posttask(self, key, result, dsk, state, worker_id):
                if key in final:
                    bar.advance(job)

        with _Bar():
            return list(dask.compute(*tasks))
