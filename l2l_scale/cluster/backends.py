"""Starting or reaching the cluster of each backend; the heavy backends import their packages only when chosen."""

from __future__ import annotations

import os
import warnings
from typing import Any

from l2l_scale.cluster.schema import (AddressConfig, ClusterConfig, CudaConfig, JobqueueConfig, KubernetesConfig,
                                      LocalConfig)
from l2l_scale.errors import ConfigError


_EXTRAS = {"slurm": "slurm", "pbs": "pbs", "lsf": "lsf", "cuda": "cuda", "kubernetes": "k8s"}
_PACKAGES = {"slurm": "dask-jobqueue", "pbs": "dask-jobqueue", "lsf": "dask-jobqueue", "cuda": "dask-cuda",
             "kubernetes": "dask-kubernetes"}
# Directive that requests {n} GPUs per job; sites that differ set ``gpu_directive`` in the config.
_GPU_DIRECTIVES = {"slurm": "--gres=gpu:{n}", "pbs": "-l ngpus={n}", "lsf": "-gpu num={n}"}


# ------------------------------------------------------------------------------------------- backends


def _require(module: str, kind: str) -> Any:
    """Import an optional backend package or raise a ConfigError with the pip command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"the {kind} backend needs {_PACKAGES[kind]}; pip install 'l2l-scale[{_EXTRAS[kind]}]'"
                          ) from None


def _local_cluster(config: LocalConfig) -> Any:
    from distributed import LocalCluster

    n_cores = os.cpu_count() or 1
    threads = config.threads_per_worker or 1
    workers = config.workers or max(1, n_cores // threads)
    import dask

    # Without distributed's MALLOC_TRIM_THRESHOLD_=65536 for its workers: a fixed trim threshold also switches off
    # glibc's adaptive mmap threshold, so every model call faulted its large activation buffers in afresh; a
    # 4096^2 bf16 predict took 6.0 s in such a worker against 5.4 s without it (and 5.4 s in-process), 2 cores.
    environ = {k: v for k, v in (dask.config.get("distributed.nanny.pre-spawn-environ", None) or {}).items()
               if k != "MALLOC_TRIM_THRESHOLD_"}
    with warnings.catch_warnings(), dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        # A busy 8787 is normal with several runs on one machine: the printed dashboard URL shows the port taken.
        warnings.filterwarnings("ignore", message="Port .* is already in use")
        return LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, host="127.0.0.1",
                            dashboard_address=config.dashboard_address, memory_limit=config.memory_limit,
                            resources=config.resources, local_directory=config.local_directory, silence_logs=40)


def _cuda_cluster(config: CudaConfig) -> Any:
    dask_cuda = _require("dask_cuda", "cuda")
    devices = config.devices
    if isinstance(devices, list):
        devices = ",".join(map(str, devices))
    # One process per GPU (LocalCUDACluster pins CUDA_VISIBLE_DEVICES per worker); GPU=1 lets predict place
    # model tasks there; scheduler and dashboard stay on loopback like the CPU LocalCluster.
    return dask_cuda.LocalCUDACluster(CUDA_VISIBLE_DEVICES=devices, threads_per_worker=config.threads_per_worker,
                                      memory_limit=config.memory_limit, host="127.0.0.1",
                                      dashboard_address=config.dashboard_address, resources={"GPU": 1},
                                      local_directory=config.local_directory, silence_logs=40)


def _jobqueue_security(config: JobqueueConfig) -> Any:
    if config.tls is None:
        return None
    if config.tls == "temporary":
        from distributed.security import Security

        return Security.temporary()
    return config.tls.security(server=True)


def _jobqueue_kwargs(config: JobqueueConfig) -> dict[str, Any]:
    """Keyword arguments for SLURMCluster/PBSCluster/LSFCluster from a config."""
    kind = config.kind
    directives = list(config.job_extra_directives)
    worker_args = list(config.worker_extra_args)
    if config.gpus_per_job:
        template = config.gpu_directive or _GPU_DIRECTIVES[kind]
        directives.insert(0, template.format(n=config.gpus_per_job))
        worker_args = ["--resources", "GPU=1", *worker_args]
    kw: dict[str, Any] = dict(
        cores=config.cores, memory=config.memory, processes=config.processes, walltime=config.walltime,
        queue=config.queue, local_directory=config.local_directory, log_directory=config.log_directory,
        job_script_prologue=list(config.job_script_prologue), job_extra_directives=directives,
        worker_extra_args=worker_args, interface=config.interface, job_name="l2l-worker",
        # The dashboard stays on the login node's loopback (SSH tunnel); the scheduler port must be reachable
        # from the compute nodes, which is what TLS is for on shared clusters.
        scheduler_options={"dashboard_address": config.dashboard_address},
    )
    if config.account:
        kw["project" if kind == "lsf" else "account"] = config.account
    if kind == "lsf":
        kw["use_stdin"] = True  # `bsub < script`, the form LSF documents for job scripts with #BSUB lines
    security = _jobqueue_security(config)
    if security is not None:
        kw.update(protocol="tls://", security=security)
        if config.tls == "temporary":
            kw["shared_temp_directory"] = config.shared_temp_directory or os.getcwd()
    return kw


def _jobqueue_cluster(config: JobqueueConfig) -> Any:
    jq = _require("dask_jobqueue", config.kind)
    cls = {"slurm": jq.SLURMCluster, "pbs": jq.PBSCluster, "lsf": jq.LSFCluster}[config.kind]
    try:
        return cls(**_jobqueue_kwargs(config))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid {config.kind} cluster settings ({exc}); check the cluster config") from None


def job_script(config: ClusterConfig) -> str:
    """The batch script (sbatch/qsub/bsub) that one worker job of a jobqueue config would run.

    Building it starts a scheduler in this process for a moment but submits nothing (and needs no ``sbatch``
    on PATH), so it can be inspected on any machine.
    """
    if not isinstance(config, JobqueueConfig):
        raise ConfigError(f"kind {config.kind} has no job script; use kind slurm, pbs or lsf")
    cluster = _jobqueue_cluster(config)
    try:
        return cluster.job_script()
    finally:
        cluster.close()


def _k8s_volume(pod_spec: dict, config: KubernetesConfig) -> None:
    """Mount the data PVC into every container of a pod spec."""
    if not config.data_pvc:
        return
    pod_spec.setdefault("volumes", []).append(
        {"name": "data", "persistentVolumeClaim": {"claimName": config.data_pvc}})
    for c in pod_spec.get("containers", []):
        c.setdefault("volumeMounts", []).append({"name": "data", "mountPath": config.data_mount})


def kubernetes_specs(config: KubernetesConfig, operator: Any) -> tuple[dict, dict | None]:
    """The DaskCluster spec and the ``gpu`` DaskWorkerGroup worker spec built with the operator's helpers.

    distributed >= 2026.6 no longer ships the ``dask-scheduler``/``dask-worker`` scripts that the operator's
    templates call, so both commands are replaced by ``dask scheduler``/``dask worker``.
    """
    worker_cmd = ["dask", "worker", "--nthreads", str(config.threads_per_worker)]
    spec = operator.make_cluster_spec(name=config.name, image=config.image, n_workers=config.workers,
                                      resources=config.worker_resources or None, env=dict(config.env),
                                      worker_command=worker_cmd,
                                      scheduler_service_type=config.scheduler_service_type)
    for c in spec["spec"]["scheduler"]["spec"]["containers"]:
        args = list(c.get("args") or [])
        if args and args[0] in ("dask-scheduler", "dask"):
            c["args"] = ["dask", "scheduler", *args[2 if args[0] == "dask" else 1:]]
    _k8s_volume(spec["spec"]["worker"]["spec"], config)
    gpu = None
    if config.gpu_workers:
        resources = {k: dict(v) for k, v in config.gpu_worker_resources.items()}
        resources.setdefault("limits", {})["nvidia.com/gpu"] = config.gpus_per_worker
        gpu = operator.make_worker_spec(image=config.image, n_workers=config.gpu_workers, resources=resources,
                                        env=dict(config.env), worker_command=[*worker_cmd, "--resources", "GPU=1"])
        _k8s_volume(gpu["spec"], config)
    return spec, gpu


def _kubernetes_cluster(config: KubernetesConfig) -> Any:
    operator = _require("dask_kubernetes.operator", "kubernetes")
    common = dict(namespace=config.namespace, port_forward_cluster_ip=config.port_forward_cluster_ip)
    if config.connect:
        return operator.KubeCluster.from_name(config.name, **common)
    spec, gpu = kubernetes_specs(config, operator)
    cluster = operator.KubeCluster(custom_cluster_spec=spec, shutdown_on_close=True, **common)
    if gpu is not None:
        try:
            cluster.add_worker_group(name="gpu", n_workers=config.gpu_workers, custom_spec=gpu)
        except BaseException:
            cluster.close()
            raise
    return cluster


def _planned_resources(config: ClusterConfig) -> dict[str, float]:
    """Resources the workers will advertise once started (adaptive clusters may have none at first)."""
    if isinstance(config, CudaConfig):
        return {"GPU": 1}
    if isinstance(config, JobqueueConfig) and config.gpus_per_job:
        return {"GPU": 1}
    if isinstance(config, KubernetesConfig) and config.gpu_workers:
        return {"GPU": 1}
    return {}


def _connect_error(config: AddressConfig, exc: BaseException) -> ConfigError:
    target = config.address or f"the scheduler file {config.scheduler_file}"
    text = str(exc) or type(exc).__name__
    low = text.lower()
    unreachable = isinstance(exc, (TimeoutError, ConnectionRefusedError)) or "timed out" in low \
        or "refused" in low
    if config.tls is None and (str(config.address or "").startswith("tls://") or "ssl_context" in low):
        return ConfigError(f"the Dask scheduler at {target} requires TLS; add tls: {{ca_file, cert, key}} to the "
                           "cluster config")
    if config.tls is not None and not unreachable and any(w in low for w in ("ssl", "certificate", "tls")):
        return ConfigError(f"TLS connection to the Dask scheduler at {target} failed ({text.splitlines()[0]}); "
                           "check that tls.ca_file signed the scheduler's certificate and cert/key are yours")
    hint = (" (if the scheduler uses TLS, add tls: {ca_file, cert, key} to the cluster config)"
            if config.tls is None else "")
    return ConfigError(f"cannot reach the Dask scheduler at {target} ({text.splitlines()[0]}); check the address "
                       f"and that the scheduler is running{hint}")


def _probe(address: str, security: Any, timeout: str) -> None:
    """Open and close one comm to the scheduler (TLS handshake included); raise what the connection raises.

    Probing first means a failed connection never leaves a half-started ``Client`` behind, whose finaliser
    can block the interpreter while it stops its event loop thread.
    """
    import asyncio

    from dask.utils import parse_timedelta
    from distributed.comm import connect

    async def _go() -> None:
        comm = await connect(address, timeout=parse_timedelta(timeout),
                             **security.get_connection_args("client"))
        await comm.close()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(_go())
        return
    # Jupyter already runs an event loop in this thread, where asyncio.run() is refused: probe from a helper thread.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _go()).result()


def _address_client(config: AddressConfig) -> Any:
    import json

    from distributed import Client
    from distributed.security import Security

    security = config.tls.security() if config.tls is not None else Security()
    if config.scheduler_file is not None:
        try:
            address = json.loads(config.scheduler_file.read_text())["address"]
        except FileNotFoundError:
            raise ConfigError(f"{config.scheduler_file}: scheduler file not found; start the scheduler with "
                              "--scheduler-file or check the path") from None
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"{config.scheduler_file}: not a scheduler file (JSON with an address); check the "
                              "path") from None
    else:
        address = config.address
        if config.tls is not None and "://" not in address:
            address = "tls://" + address
    try:
        _probe(address, security, config.timeout)
    except Exception as exc:
        # Connection failures surface as OSError, TimeoutError, ssl errors, TypeError (tls:// without a
        # context) or even AssertionError (a tcp:// handshake answered by a TLS port); all mean "cannot connect".
        raise _connect_error(config, exc) from None
    try:
        return Client(address, timeout=config.timeout, security=security)
    except Exception as exc:  # the scheduler went away between the probe and now
        raise _connect_error(config, exc) from None
