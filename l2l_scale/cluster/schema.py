"""The cluster configuration: one pydantic model per ``kind`` of the YAML schema, and the parsing of a config
file or of the CLI's shorthand cluster flags into one of them (the kinds are listed in :mod:`l2l_scale.cluster`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from l2l_scale.errors import ConfigError


DEFAULT_DASHBOARD = "127.0.0.1:8787"
CLUSTER_ENV = "L2L_SCALE_CLUSTER"  # a default --cluster file, e.g. set once in a facility's module file


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
