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

import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterable, Iterator, Literal, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from l2l_scale.errors import ConfigError
from l2l_scale.io.atomic import say as _say

DEFAULT_DASHBOARD = "127.0.0.1:8787"
CLUSTER_ENV = "L2L_SCALE_CLUSTER"  # a default --cluster file, e.g. set once in a facility's module file
_EXTRAS = {"slurm": "slurm", "pbs": "pbs", "lsf": "lsf", "cuda": "cuda", "kubernetes": "k8s"}
_PACKAGES = {"slurm": "dask-jobqueue", "pbs": "dask-jobqueue", "lsf": "dask-jobqueue", "cuda": "dask-cuda",
             "kubernetes": "dask-kubernetes"}
# Directive that requests {n} GPUs per job; sites that differ set ``gpu_directive`` in the config.
_GPU_DIRECTIVES = {"slurm": "--gres=gpu:{n}", "pbs": "-l ngpus={n}", "lsf": "-gpu num={n}"}
_PLANNED: dict[int, dict[str, float]] = {}  # id(client) -> resources its workers will have once they start


def _check_size(v: str | None) -> str | None:
    from dask.utils import parse_bytes

    if v not in (None, "auto", "0"):
        try:
            parse_bytes(v)
        except (ValueError, TypeError):
            raise ValueError(f"{v!r} is not a size like '4GB' or 'auto'") from None
    return v


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSFiles(_Model):
    """PEM files for TLS: the CA that signed every certificate, and this party's certificate and key.

    One certificate/key pair may serve scheduler, workers and client (as in ``deploy/``); then the same
    ``tls`` block works for every role.
    """

    ca_file: Path
    cert: Path
    key: Path

    @field_validator("ca_file", "cert", "key")
    @classmethod
    def _exists(cls, v: Path) -> Path:
        v = Path(os.path.expanduser(str(v)))
        if not v.is_file():
            raise ValueError(f"{v} does not exist; give the path of a PEM file")
        return v

    def security(self, *, server: bool = False) -> Any:
        """A ``distributed.security.Security`` that requires encryption (client role, or every role)."""
        from distributed.security import Security

        files = dict(tls_ca_file=str(self.ca_file), tls_client_cert=str(self.cert), tls_client_key=str(self.key))
        if server:
            files.update(tls_scheduler_cert=str(self.cert), tls_scheduler_key=str(self.key),
                         tls_worker_cert=str(self.cert), tls_worker_key=str(self.key))
        return Security(require_encryption=True, **files)


class _LocalWorkers(_Model):
    """Workers started on this machine: a per-worker memory limit, checked like Dask's own sizes."""

    memory_limit: str = "auto"

    @field_validator("memory_limit")
    @classmethod
    def _memory(cls, v: str) -> str:
        return _check_size(v)


class LocalConfig(_LocalWorkers):
    """``kind: local``: a LocalCluster on this machine (scheduler and dashboard on 127.0.0.1).

    Attributes
    ----------
    workers, threads_per_worker : int, optional
        Worker processes and threads each; by default one single-threaded worker per core (model steps such
        as ``predict``: one worker with a thread per core, so the model exists once).
    memory_limit : str
        Per-worker memory limit (dask syntax, e.g. ``"4GB"``), ``"auto"`` by default.
    dashboard_address : str
        Where the dashboard listens; loopback unless changed on purpose (e.g. ``":8787"`` for every interface).
    resources : dict, optional
        Worker resources to advertise, e.g. ``{"GPU": 1}`` on a single-GPU workstation.
    local_directory : str, optional
        Scratch space for spilled data (default: dask's temporary directory).
    """

    kind: Literal["local"] = "local"
    workers: int | None = Field(default=None, ge=1)
    threads_per_worker: int | None = Field(default=None, ge=1)
    dashboard_address: str = DEFAULT_DASHBOARD
    resources: dict[str, float] | None = None
    local_directory: str | None = None


class ThreadsConfig(_Model):
    """``kind: threads``: no cluster, dask's threaded scheduler in this process (no dashboard)."""

    kind: Literal["threads"] = "threads"


class AddressConfig(_Model):
    """``kind: address``: connect to a running scheduler.

    Attributes
    ----------
    address : str, optional
        e.g. ``tcp://10.0.0.5:8786`` or ``tls://node17:8786``.
    scheduler_file : path, optional
        The JSON written by ``dask scheduler --scheduler-file`` (instead of ``address``).
    tls : TLSFiles, optional
        CA, certificate and key; encryption is then required.
    timeout : str
        How long to try to connect (default ``"20s"``).
    """

    kind: Literal["address"] = "address"
    address: str | None = None
    scheduler_file: Path | None = None
    tls: TLSFiles | None = None
    timeout: str = "20s"

    @model_validator(mode="after")
    def _one_target(self) -> "AddressConfig":
        if (self.address is None) == (self.scheduler_file is None):
            raise ValueError("give exactly one of address or scheduler_file")
        return self


class CudaConfig(_LocalWorkers):
    """``kind: cuda``: dask-cuda's LocalCUDACluster, one worker process per GPU advertising ``GPU=1``.

    Attributes
    ----------
    devices : str or list of int, optional
        GPUs to use (``CUDA_VISIBLE_DEVICES`` syntax, e.g. ``"0,1"``); default all.
    threads_per_worker : int
        Threads per GPU worker (default 2: one runs the model while the other reads and writes blocks).
    memory_limit, dashboard_address, local_directory
        As for ``local``.
    """

    kind: Literal["cuda"] = "cuda"
    devices: str | list[int] | None = None
    threads_per_worker: int = Field(default=2, ge=1)
    dashboard_address: str = DEFAULT_DASHBOARD
    local_directory: str | None = None


class JobqueueConfig(_Model):
    """``kind: slurm | pbs | lsf``: workers are batch jobs (dask-jobqueue), the scheduler runs in this process.

    Attributes
    ----------
    queue, account : str, optional
        Partition/queue and account/project to charge.
    walltime : str
        Per job, ``HH:MM:SS`` (default one hour).
    cores, memory, processes : int, str, int
        Per job: cores, memory (``"16GB"``) and worker processes (1 with a GPU).
    gpus_per_job : {0, 1}
        GPUs per job; 1 adds ``gpu_directive`` (default ``--gres=gpu:1``, ``-l ngpus=1``, ``-gpu num=1``) and
        makes each worker advertise ``GPU=1``. For more GPUs raise ``maximum_jobs`` (one job per GPU).
    gpu_directive : str, optional
        The scheduler directive with ``{n}`` for the GPU count, for sites with another syntax
        (e.g. ``"--gpus={n}"``).
    minimum_jobs, maximum_jobs : int
        Adaptive scaling range; jobs are submitted when work is waiting and cancelled when idle.
    local_directory, log_directory : str, optional
        Node-local scratch (e.g. ``$TMPDIR``) and where the jobs' stdout/stderr go.
    job_script_prologue : list of str
        Shell lines before the worker starts, e.g. ``module load cuda/12.2``.
    job_extra_directives, worker_extra_args : list of str
        Extra ``#SBATCH``/``#PBS``/``#BSUB`` directives and ``dask worker`` arguments.
    interface : str, optional
        Network interface for scheduler and workers (e.g. ``ib0``); default: the host's address.
    dashboard_address : str
        Where the dashboard listens on this (login) node; loopback by default, reach it with an SSH tunnel.
    tls : TLSFiles or "temporary", optional
        Encrypt and authenticate scheduler/worker/client traffic. ``temporary`` makes a self-signed
        certificate for this run, written to ``shared_temp_directory`` for the jobs to read.
    shared_temp_directory : str, optional
        A directory on a filesystem the compute nodes share (for ``tls: temporary``; default: the current one).
    """

    kind: Literal["slurm", "pbs", "lsf"]
    queue: str | None = None
    account: str | None = None
    walltime: str = "01:00:00"
    cores: int = Field(default=4, ge=1)
    memory: str = "16GB"
    processes: int = Field(default=1, ge=1)
    gpus_per_job: int = Field(default=0, ge=0)
    gpu_directive: str | None = None
    minimum_jobs: int = Field(default=0, ge=0)
    maximum_jobs: int = Field(default=4, ge=1)
    local_directory: str | None = None
    log_directory: str | None = None
    job_script_prologue: list[str] = []
    job_extra_directives: list[str] = []
    worker_extra_args: list[str] = []
    interface: str | None = None
    dashboard_address: str = DEFAULT_DASHBOARD
    tls: TLSFiles | Literal["temporary"] | None = None
    shared_temp_directory: str | None = None

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        if v == "auto":
            raise ValueError("give the memory per job, e.g. '16GB'")
        return _check_size(v)

    @field_validator("tls", mode="before")
    @classmethod
    def _tls(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "temporary":
            raise ValueError(f"{v!r} is neither 'temporary' nor a mapping with ca_file, cert and key")
        return v

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, v: str) -> str:
        parts = v.split(":")
        if not (1 <= len(parts) <= 3 and all(p.isdigit() for p in parts)):
            raise ValueError(f"{v!r} is not a walltime like '02:00:00'")
        return v

    @model_validator(mode="after")
    def _check(self) -> "JobqueueConfig":
        if self.minimum_jobs > self.maximum_jobs:
            raise ValueError(f"minimum_jobs {self.minimum_jobs} is larger than maximum_jobs {self.maximum_jobs}")
        if self.gpus_per_job > 1:
            raise ValueError("gpus_per_job must be 0 or 1 (several GPUs in one job would all run on the first); "
                             "raise maximum_jobs to use more GPUs")
        if self.gpus_per_job and self.processes != 1:
            raise ValueError("a GPU job runs one worker process; set processes: 1")
        if self.gpu_directive is not None and "{n}" not in self.gpu_directive:
            raise ValueError(f"gpu_directive {self.gpu_directive!r} needs '{{n}}' where the GPU count goes")
        return self


class KubernetesConfig(_Model):
    """``kind: kubernetes``: a DaskCluster made by the dask-kubernetes operator.

    Attributes
    ----------
    name, namespace : str
        DaskCluster name (pods are ``<name>-...``) and namespace (default: the current one).
    image : str
        Container image with l2l-scale installed (see ``deploy/docker``); the same for every pod.
    workers, worker_resources : int, dict
        The default (CPU) worker group: size and pod ``resources`` (``{"limits": {"cpu": "2", ...}}``).
    gpu_workers, gpus_per_worker, gpu_worker_resources : int, int, dict
        The ``gpu`` worker group: pods requesting ``nvidia.com/gpu: gpus_per_worker`` whose workers advertise
        ``GPU=1``; ``gpu_worker_resources`` adds CPU/memory requests and limits.
    threads_per_worker : int
        Threads per worker (default 2).
    env : dict
        Environment variables for every pod.
    data_pvc, data_mount : str
        A ReadWriteMany PersistentVolumeClaim with the data, mounted at ``data_mount`` in every worker (the
        client that runs ``l2l-scale`` must see the same paths, e.g. run it in a pod with the same mount).
    connect : bool
        Connect to an existing DaskCluster called ``name`` (e.g. applied from ``deploy/kubernetes``) instead of
        creating one; it is then left running on exit.
    port_forward_cluster_ip : bool, optional
        Forward the scheduler's ClusterIP service to this machine (when running outside the Kubernetes cluster).
    scheduler_service_type : str
        ``ClusterIP`` (default), ``NodePort`` or ``LoadBalancer``.
    """

    kind: Literal["kubernetes"] = "kubernetes"
    name: str = "l2l-scale"
    namespace: str | None = None
    image: str | None = None
    workers: int = Field(default=1, ge=0)
    worker_resources: dict[str, dict[str, Any]] = {}
    gpu_workers: int = Field(default=0, ge=0)
    gpus_per_worker: int = Field(default=1, ge=1)
    gpu_worker_resources: dict[str, dict[str, Any]] = {}
    threads_per_worker: int = Field(default=2, ge=1)
    env: dict[str, str] = {}
    data_pvc: str | None = None
    data_mount: str = "/data"
    connect: bool = False
    port_forward_cluster_ip: bool | None = None
    scheduler_service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"

    @field_validator("worker_resources", "gpu_worker_resources")
    @classmethod
    def _resources(cls, v: dict) -> dict:
        bad = set(v) - {"limits", "requests"}
        if bad:
            raise ValueError(f"unknown section(s) {', '.join(sorted(bad))}; use limits and requests")
        return v

    @model_validator(mode="after")
    def _check(self) -> "KubernetesConfig":
        if not self.connect and not self.image:
            raise ValueError("image is required to create a cluster (an image with l2l-scale installed, see "
                             "deploy/docker); or set connect: true to use an existing DaskCluster")
        return self


ClusterConfig = Annotated[Union[LocalConfig, ThreadsConfig, AddressConfig, CudaConfig, JobqueueConfig,
                                KubernetesConfig], Field(discriminator="kind")]
_ADAPTER: TypeAdapter = TypeAdapter(ClusterConfig)
_KINDS = ("local", "threads", "address", "cuda", "slurm", "pbs", "lsf", "kubernetes")
_MODELS = {"local": LocalConfig, "threads": ThreadsConfig, "address": AddressConfig, "cuda": CudaConfig,
           "slurm": JobqueueConfig, "pbs": JobqueueConfig, "lsf": JobqueueConfig, "kubernetes": KubernetesConfig}


# ------------------------------------------------------------------------------------------- parsing


def _error_text(exc: ValidationError, data: Any) -> str:
    """One line for the first validation error, naming the key and what to do."""
    e = exc.errors()[0]
    loc = [str(p) for p in e.get("loc", ())]
    kind = data.get("kind") if isinstance(data, dict) else None
    if loc and (loc[0] in _KINDS or loc[0].startswith("function-")):  # the union's tag, not a key
        loc = loc[1:]
    key = ".".join(loc)
    if e.get("type") == "union_tag_invalid":
        return f"kind {kind!r} is not one of {', '.join(_KINDS)}"
    if e.get("type") == "extra_forbidden":
        model = _MODELS.get(str(kind))
        allowed = ", ".join(k for k in model.model_fields if k != "kind") if model else ""
        return f"unknown key {key!r} for kind {kind}" + (f"; allowed keys: {allowed}" if allowed else "")
    msg = str(e.get("msg", "")).removeprefix("Value error, ")
    return f"{key}: {msg}" if key else msg


def parse_cluster_config(data: Any, *, source: str = "cluster config") -> ClusterConfig:
    """Validate a mapping (e.g. parsed YAML) into a cluster config; ``kind`` defaults to ``local``.

    Raises
    ------
    ConfigError
        One line naming the source, the offending key and the fix.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping of keys like 'kind: slurm', not {type(data).__name__}")
    data = {"kind": "local", **data}
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_error_text(exc, data)}") from None


def load_cluster_config(path: str | Path) -> ClusterConfig:
    """Read a cluster config YAML file (see ``deploy/`` for examples of every kind)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: cluster config not found; check the path given to --cluster") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the cluster config ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}; fix the syntax") from None
    return parse_cluster_config(data, source=str(path))


def config_from_options(workers: int | None = None, threads_per_worker: int | None = None,
                        memory_limit: str | None = None, scheduler: str | None = None, *,
                        model_step: bool = False, cluster_file: str | Path | None = None) -> ClusterConfig:
    """Turn the CLI cluster options into a cluster config.

    ``cluster_file`` (``--cluster``, else ``$L2L_SCALE_CLUSTER``) is read as YAML and cannot be combined with
    the shorthand flags. ``--scheduler`` takes an address, a scheduler JSON file, or ``threads``.

    ``model_step`` changes the LocalCluster default to one worker process with a thread per core: a TensorFlow
    model then exists once (its memory is counted once, and its thread pool uses every core) while the other
    threads read and write blocks. GPU clusters use one worker per GPU instead.
    """
    flags = {"--workers": workers, "--threads-per-worker": threads_per_worker, "--memory-limit": memory_limit,
             "--scheduler": scheduler}
    given = [k for k, v in flags.items() if v is not None]
    from_env = cluster_file is None and not given and os.environ.get(CLUSTER_ENV)
    if cluster_file is not None or from_env:
        if given:
            raise ConfigError(f"--cluster and {', '.join(given)} cannot be combined; put the settings in "
                              f"{cluster_file} instead")
        config = load_cluster_config(cluster_file or from_env)
        if model_step and isinstance(config, LocalConfig) and config.workers is None \
                and config.threads_per_worker is None:
            config = config.model_copy(update={"workers": 1, "threads_per_worker": os.cpu_count() or 1})
        return config
    if model_step and workers is None and threads_per_worker is None:
        workers, threads_per_worker = 1, os.cpu_count() or 1
    if scheduler == "threads":
        return ThreadsConfig()
    if scheduler:
        # A path to an existing file (or anything ending in .json) is a scheduler file, else an address.
        if scheduler.endswith(".json") or Path(scheduler).is_file():
            return parse_cluster_config({"kind": "address", "scheduler_file": scheduler}, source="--scheduler")
        return parse_cluster_config({"kind": "address", "address": scheduler}, source="--scheduler")
    return parse_cluster_config({"kind": "local", "workers": workers, "threads_per_worker": threads_per_worker,
                                 "memory_limit": memory_limit or "auto"}, source="cluster options")


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
    with warnings.catch_warnings():
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


def current_client() -> Any:
    """The active distributed client, or ``None``."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


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
    :data:`WAVE_TASKS` tasks. With a distributed client the next wave is submitted while the current one still
    runs (once fewer than half a wave is left), so workers never idle between fields, and the client holds the
    task descriptions of at most about two waves. One progress bar counts tasks, units finished, the ETA and
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

        def next_wave() -> list:
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
                if len(wave) >= WAVE_TASKS:
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

        def submit(wave: list) -> bool:
            if wave:
                futures = client.compute(wave, resources=resources)
                live.update(futures)
                ac.update(futures)
            return bool(wave)

        more = submit(next_wave())
        try:
            for fut in ac:
                fut.result()
                live.discard(fut)
                task_done(fut.key)
                if more and ac.count() < WAVE_TASKS // 2:
                    more = submit(next_wave())
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
