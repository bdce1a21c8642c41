"""The one place that creates or connects Dask clusters, and runs task lists with progress.

Every command takes a cluster either as a YAML file (``--cluster FILE.yaml``, see :func:`load_cluster_config`)
or as shorthand flags (``--workers``, ``--threads-per-worker``, ``--memory-limit``, ``--scheduler``). A file
picks one backend with ``kind``:

``local`` (default)
    A LocalCluster of worker processes; scheduler and dashboard listen on 127.0.0.1 only.
``threads``
    No cluster: dask's threaded scheduler in this process (no dashboard), for small jobs and debugging.
``address``
    An existing scheduler (``address`` or ``scheduler_file``), optionally over TLS.
``cuda``
    dask-cuda's LocalCUDACluster: one worker per GPU, each advertising the ``GPU=1`` resource.
``slurm``, ``pbs``, ``lsf``
    dask-jobqueue: the scheduler runs here, workers are batch jobs scaled adaptively between ``minimum_jobs``
    and ``maximum_jobs``; ``gpus_per_job: 1`` requests a GPU per job and advertises ``GPU=1``.
``kubernetes``
    The dask-kubernetes operator: a DaskCluster with a default (CPU) worker group and a ``gpu`` worker group
    whose pods request ``nvidia.com/gpu``.

The heavy backends import their packages only when chosen; a missing package gives a one-line install hint.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from l2l_scale.cluster.backends import (_address_client, _cuda_cluster, _jobqueue_cluster, _kubernetes_cluster,
                                        _local_cluster, _planned_resources, job_script, kubernetes_specs)
from l2l_scale.cluster.schema import (CLUSTER_ENV, DEFAULT_DASHBOARD, AddressConfig, ClusterConfig, CudaConfig,
                                      JobqueueConfig, KubernetesConfig, LocalConfig, ThreadsConfig, TLSFiles,
                                      config_from_options, load_cluster_config, parse_cluster_config)
from l2l_scale.cluster.waves import WAVE_TASKS, compute_waves, compute_with_progress, current_client
from l2l_scale.errors import ConfigError
from l2l_scale.io.atomic import say as _say

__all__ = [
    "CLUSTER_ENV",
    "DEFAULT_DASHBOARD",
    "WAVE_TASKS",
    "AddressConfig",
    "ClusterConfig",
    "CudaConfig",
    "JobqueueConfig",
    "KubernetesConfig",
    "LocalConfig",
    "TLSFiles",
    "ThreadsConfig",
    "compute_waves",
    "compute_with_progress",
    "config_from_options",
    "current_client",
    "dask_client",
    "job_script",
    "kubernetes_specs",
    "load_cluster_config",
    "parse_cluster_config",
    "worker_resources",
]

_PLANNED: dict[int, dict[str, float]] = {}  # id(client) -> resources its workers will have once they start


def _open(config: ClusterConfig) -> tuple[Any, Any]:
    """(cluster or None, client) for a non-threads config."""
    from distributed import Client

    if isinstance(config, AddressConfig):
        return None, _address_client(config)
    if isinstance(config, LocalConfig):
        cluster = _local_cluster(config)
    elif isinstance(config, CudaConfig):
        cluster = _cuda_cluster(config)
    elif isinstance(config, JobqueueConfig):
        cluster = _jobqueue_cluster(config)
        cluster.adapt(minimum_jobs=config.minimum_jobs, maximum_jobs=config.maximum_jobs)
        _say(f"{config.kind.upper()} workers: {config.minimum_jobs}-{config.maximum_jobs} jobs of {config.cores} "
             f"cores, {config.memory}" + (f", {config.gpus_per_job} GPU" if config.gpus_per_job else "")
             + (f" in {config.queue}" if config.queue else "") + ", submitted as work arrives")
    elif isinstance(config, KubernetesConfig):
        cluster = _kubernetes_cluster(config)
    else:  # pragma: no cover - the union is closed
        raise ConfigError(f"unknown cluster kind {config.kind!r}")
    try:
        security = getattr(cluster, "security", None)
        client = Client(cluster, security=security) if security is not None else Client(cluster)
    except BaseException:
        cluster.close()
        raise
    return cluster, client


@contextmanager
def dask_client(config: ClusterConfig | None = None) -> Iterator[Any]:
    """Yield a connected ``distributed.Client`` (or ``None`` for ``kind: threads``) and close it afterwards.

    The dashboard URL is printed as soon as the client exists. Clusters this function started are closed
    (batch jobs cancelled, Kubernetes resources deleted); an ``address`` cluster is left running.
    """
    config = config if config is not None else LocalConfig()
    if isinstance(config, ThreadsConfig):
        yield None
        return
    cluster, client = _open(config)
    _say(f"Dask dashboard: {client.dashboard_link}")
    _PLANNED[id(client)] = _planned_resources(config)
    try:
        yield client
    finally:
        _PLANNED.pop(id(client), None)
        client.close()
        if cluster is not None:
            cluster.close()


def worker_resources(client: Any) -> dict[str, float]:
    """Resources (e.g. GPU) advertised by the cluster's workers, or planned for workers not yet started.

    An adaptive jobqueue or Kubernetes cluster may have no workers when a command starts; its GPU workers
    will advertise ``GPU=1``, so tasks are placed as if they were already there.
    """
    if client is None:
        return {}
    total: dict[str, float] = {}
    for w in client.scheduler_info(n_workers=-1)["workers"].values():
        for k, v in (w.get("resources") or {}).items():
            total[k] = total.get(k, 0) + v
    for k, v in _PLANNED.get(id(client), {}).items():
        total.setdefault(k, v)
    return total
