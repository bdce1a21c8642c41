"""l2l_scale.cluster: config files and their errors, loopback-only local clusters, TLS against a real TLS scheduler,
jobqueue scripts and adaptive submission (with a stand-in sbatch), and the cuda/kubernetes wiring (stand-in modules,
the real packages are optional extras)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import sys
import time
import types
from pathlib import Path

import pytest

from _dask_procs import spawn, start_scheduler
from l2l_scale import cluster as cl
from l2l_scale.cli import main
from l2l_scale.errors import ConfigError

pytestmark = pytest.mark.timeout(300)


def _yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ config parsing


def test_config_files_parse_and_reject_bad_keys(tmp_path):
    cfg = cl.load_cluster_config(_yaml(tmp_path / "a.yaml", "kind: slurm\nqueue: gpu\ngpus_per_job: 1\n"))
    assert isinstance(cfg, cl.JobqueueConfig) and cfg.queue == "gpu" and cfg.maximum_jobs == 4
    assert isinstance(cl.load_cluster_config(_yaml(tmp_path / "e.yaml", "")), cl.LocalConfig)  # kind: local
    bad = {
        "kind: slurm\nworkers: 4\n": "unknown key 'workers' for kind slurm; allowed keys: queue, account",
        "kind: lokal\n": "kind 'lokal' is not one of local, threads, address",
        "kind: local\nmemory_limit: lots\n": "memory_limit: 'lots' is not a size like '4GB'",
        "kind: address\n": "give exactly one of address or scheduler_file",
        "kind: address\naddress: tls://x:1\ntls: {ca_file: /no/ca.pem, cert: /no/c.pem, key: /no/k.pem}\n":
            "tls.ca_file: /no/ca.pem does not exist",
        "kind: slurm\ngpus_per_job: 2\n": "raise maximum_jobs to use more GPUs",
        "kind: slurm\nwalltime: 2h\n": "walltime: '2h' is not a walltime",
        "kind: slurm\nminimum_jobs: 5\nmaximum_jobs: 2\n": "minimum_jobs 5 is larger than maximum_jobs 2",
        "kind: kubernetes\n": "image is required",
        "kind: [local\n": "not valid YAML at line",
        "- local\n": "must be a mapping",
    }
    for i, (text, message) in enumerate(bad.items()):
        path = _yaml(tmp_path / f"bad{i}.yaml", text)
        with pytest.raises(ConfigError) as err:
            cl.load_cluster_config(path)
        assert str(err.value).startswith(f"{path}: ") and message in str(err.value), str(err.value)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="cluster config not found"):
        cl.load_cluster_config(tmp_path / "missing.yaml")


def test_cli_cluster_flag_errors_are_one_line(tmp_path, capsys, monkeypatch):
    path = _yaml(tmp_path / "c.yaml", "kind: slurm\nthreads: 4\n")
    assert main(["stats", str(tmp_path), "--cluster", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("l2l-scale stats: error: ") and "unknown key 'threads' for kind slurm" in err
    assert len(err.splitlines()) == 1
    assert main(["stats", str(tmp_path), "--cluster", str(path), "--workers", "2"]) == 2
    assert "--cluster and --workers cannot be combined" in capsys.readouterr().err
    # the environment variable is the default --cluster
    monkeypatch.setenv(cl.CLUSTER_ENV, str(path))
    assert main(["stats", str(tmp_path)]) == 2
    assert "unknown key 'threads'" in capsys.readouterr().err


def test_shorthand_flags_map_to_configs(tmp_path):
    assert isinstance(cl.config_from_options(scheduler="threads"), cl.ThreadsConfig)
    assert cl.config_from_options(scheduler="tcp://10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    sched = tmp_path / "scheduler.json"
    sched.write_text("{}")
    assert cl.config_from_options(scheduler=str(sched)).scheduler_file == sched
    local = cl.config_from_options(model_step=True)
    assert (local.workers, local.threads_per_worker) == (1, os.cpu_count() or 1)
    assert local.dashboard_address.startswith("127.0.0.1:")
    with pytest.raises(ConfigError, match="memory_limit"):
        cl.config_from_options(memory_limit="much")
    # model_step applies to a local config file that leaves the size open
    f = _yaml(tmp_path / "l.yaml", "kind: local\nmemory_limit: 2GB\n")
    assert cl.config_from_options(model_step=True, cluster_file=f).workers == 1


def test_missing_extras_give_install_hints(monkeypatch):
    for module in ("dask_jobqueue", "dask_cuda", "dask_kubernetes", "dask_kubernetes.operator"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    cases = [({"kind": "slurm"}, "the slurm backend needs dask-jobqueue; pip install 'l2l-scale[slurm]'"),
             ({"kind": "pbs"}, "pip install 'l2l-scale[pbs]'"),
             ({"kind": "cuda"}, "the cuda backend needs dask-cuda; pip install 'l2l-scale[cuda]'"),
             ({"kind": "kubernetes", "image": "x"},
              "the kubernetes backend needs dask-kubernetes; pip install 'l2l-scale[k8s]'")]
    for data, message in cases:
        with pytest.raises(ConfigError) as err:
            with cl.dask_client(cl.parse_cluster_config(data)):
                pass
        assert message in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ local cluster


def _listening(pid: int) -> set[tuple[str, int]]:
    import psutil

    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def test_local_cluster_listens_on_loopback_only():
    before = _listening(os.getpid())
    config = cl.LocalConfig(workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0")
    with cl.dask_client(config) as client:
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        assert all(a.startswith("tcp://127.0.0.1:") for a in client.scheduler_info(n_workers=-1)["workers"])
        opened = _listening(os.getpid()) - before  # the scheduler and dashboard run in this process
        assert len(opened) >= 2 and {ip for ip, _ in opened} == {"127.0.0.1"}, opened
        assert cl.worker_resources(client) == {}
        # distributed's other worker variables stay; its malloc trim threshold (a slower model, see backends) goes.
        env = client.run(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS")))
        assert list(env.values()) == [(None, "1")]
    assert cl.LocalConfig().dashboard_address == "127.0.0.1:8787"


# ------------------------------------------------------------------------------------------------- TLS


def _certificates(folder: Path, name: str) -> dict[str, Path]:
    """A throwaway CA and one certificate/key it signed (valid for 127.0.0.1), as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5),
                 not_valid_after=now + datetime.timedelta(hours=2))

    def build(subject, issuer, key, signer, *, ca):
        b = x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
        b = b.serial_number(x509.random_serial_number()).not_valid_before(valid["not_valid_before"])
        b = b.not_valid_after(valid["not_valid_after"])
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = build(ca_name, ca_name, ca_key, ca_key, ca=True)
    cert = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), ca_name, key, ca_key, ca=False)
    files = {"ca_file": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    files["ca_file"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return files


@pytest.fixture
def tls_cluster(tmp_path):
    """`dask scheduler` + `dask worker` that accept only TLS with certificates from one CA."""
    pytest.importorskip("cryptography")
    certs = _certificates(tmp_path / "ours", "l2l")
    tls = ["--tls-ca-file", certs["ca_file"], "--tls-cert", certs["cert"], "--tls-key", certs["key"]]
    sched_file = tmp_path / "scheduler.json"
    log = open(tmp_path / "tls.log", "w")
    scheduler, address = start_scheduler(log, sched_file, "--protocol", "tls", *tls)
    procs = [scheduler, spawn(log, "worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard",
                              *tls)]
    try:
        yield address, certs
    finally:
        for p in procs[::-1]:
            p.kill()
            p.wait(timeout=30)
        log.close()


def test_tls_scheduler_accepts_our_certificates_and_refuses_others(tls_cluster, tmp_path):
    address, certs = tls_cluster
    assert address.startswith("tls://127.0.0.1:")
    ours = _yaml(tmp_path / "tls.yaml", f"kind: address\naddress: {address}\ntimeout: 10s\ntls:\n"
                 + "".join(f"  {k}: {v}\n" for k, v in certs.items()))
    with cl.dask_client(cl.load_cluster_config(ours)) as client:
        client.wait_for_workers(1, timeout=60)
        assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6

    no_cert = cl.parse_cluster_config({"kind": "address", "address": address, "timeout": "3s"})
    with pytest.raises(ConfigError, match=r"requires TLS; add tls: \{ca_file, cert, key\}"):
        with cl.dask_client(no_cert):
            pass
    foreign = _certificates(tmp_path / "theirs", "intruder")  # signed by another CA
    with pytest.raises(ConfigError, match="TLS connection to the Dask scheduler at .* failed"):
        with cl.dask_client(cl.parse_cluster_config({"kind": "address", "address": address, "timeout": "3s",
                                                     "tls": {k: str(v) for k, v in foreign.items()}})):
            pass
    plain = cl.parse_cluster_config({"kind": "address", "address": address.replace("tls://", "tcp://"),
                                     "timeout": "2s"})
    with pytest.raises(ConfigError, match="cannot reach the Dask scheduler at tcp://.*if the scheduler uses TLS"):
        with cl.dask_client(plain):
            pass


# --------------------------------------------------------------------------------------------- jobqueue


def test_jobqueue_tls_and_resources_in_job_script(tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue")
    pytest.importorskip("cryptography")
    monkeypatch.chdir(tmp_path)
    certs = {k: str(v) for k, v in _certificates(tmp_path / "certs", "l2l").items()}
    script = cl.job_script(cl.parse_cluster_config(
        {"kind": "slurm", "queue": "gpu", "gpus_per_job": 1, "gpu_directive": "--gpus={n}", "tls": certs,
         "interface": "lo", "job_script_prologue": ["module load cuda/12.4"]}))
    assert "#SBATCH --gpus=1" in script and "--gres" not in script
    assert "--resources GPU=1" in script and "module load cuda/12.4" in script
    assert " tls://127.0.0.1:" in script and f"--tls-ca-file {certs['ca_file']}" in script
    assert f"--tls-cert {certs['cert']}" in script and f"--tls-key {certs['key']}" in script
    # tls: temporary writes a throwaway certificate where the jobs can read it
    shared = tmp_path / "shared"
    shared.mkdir()
    script = cl.job_script(cl.parse_cluster_config({"kind": "pbs", "tls": "temporary", "interface": "lo",
                                                    "shared_temp_directory": str(shared)}))
    assert " tls://" in script and f"--tls-ca-file {shared}" in script
    with pytest.raises(ConfigError, match="kind local has no job script"):
        cl.job_script(cl.LocalConfig())


def test_slurm_cluster_submits_jobs_adaptively(tmp_path, monkeypatch):
    """minimum_jobs=1 makes the adaptive cluster submit a job right away; a stand-in sbatch records it."""
    pytest.importorskip("dask_jobqueue")
    monkeypatch.chdir(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$(dirname "$0")/submitted-$$.sh"\n'
                                    'echo "Submitted batch job $$"\n')
    (bin_dir / "scancel").write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/cancelled"\n')
    for f in ("sbatch", "scancel"):
        (bin_dir / f).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = cl.parse_cluster_config({"kind": "slurm", "queue": "gpu", "walltime": "00:10:00", "cores": 2,
                                      "memory": "4GB", "gpus_per_job": 1, "minimum_jobs": 1, "maximum_jobs": 2,
                                      "interface": "lo", "dashboard_address": "127.0.0.1:0"})
    with cl.dask_client(config) as client:
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        # no worker has started (the jobs are fake), but predict must still send model tasks to GPU workers
        assert cl.worker_resources(client) == {"GPU": 1}
        deadline = time.time() + 60
        while not list(bin_dir.glob("submitted-*.sh")) and time.time() < deadline:
            time.sleep(0.2)
    scripts = list(bin_dir.glob("submitted-*.sh"))
    assert scripts, "adapt(minimum_jobs=1) must submit a job"
    text = scripts[0].read_text()
    assert "#SBATCH -p gpu" in text and "#SBATCH --gres=gpu:1" in text and "#SBATCH -t 00:10:00" in text
    assert "--resources GPU=1" in text
    assert (bin_dir / "cancelled").exists(), "closing the cluster cancels its jobs"


# ------------------------------------------------------------------------------- cuda and kubernetes wiring


def test_cuda_backend_one_gpu_worker_each_on_loopback(monkeypatch):
    calls = {}

    class LocalCUDACluster:
        def __init__(self, **kwargs):
            calls.update(kwargs)

    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=LocalCUDACluster))
    config = cl.parse_cluster_config({"kind": "cuda", "devices": [0, 2]})
    cl._cuda_cluster(config)
    assert calls["CUDA_VISIBLE_DEVICES"] == "0,2" and calls["resources"] == {"GPU": 1}
    assert calls["host"] == "127.0.0.1" and calls["dashboard_address"].startswith("127.0.0.1:")
    assert cl._planned_resources(config) == {"GPU": 1}


def _fake_operator(record: dict) -> types.ModuleType:
    """Stand-in for dask_kubernetes.operator with the spec layout of its make_*_spec helpers."""
    def make_worker_spec(image, n_workers, resources=None, env=None, worker_command="dask-worker"):
        cmd = worker_command.split(" ") if isinstance(worker_command, str) else list(worker_command)
        return {"replicas": n_workers, "spec": {"containers": [{
            "name": "worker", "image": image, "args": cmd + ["--name", "$(DASK_WORKER_NAME)"],
            "env": [{"name": k, "value": v} for k, v in (env or {}).items()], "resources": resources}]}}

    def make_cluster_spec(name, image, n_workers=None, resources=None, env=None, worker_command="dask-worker",
                          scheduler_service_type="ClusterIP"):
        return {"apiVersion": "kubernetes.dask.org/v1", "kind": "DaskCluster", "metadata": {"name": name},
                "spec": {"worker": make_worker_spec(image, n_workers, resources, env, worker_command),
                         "scheduler": {"spec": {"containers": [{"name": "scheduler", "image": image,
                                                                "args": ["dask-scheduler", "--host", "0.0.0.0"]}]},
                                       "service": {"type": scheduler_service_type}}}}

    class KubeCluster:
        def __init__(self, **kwargs):
            record["cluster"] = kwargs
            record["groups"] = []

        def add_worker_group(self, **kwargs):
            record["groups"].append(kwargs)

        def close(self):
            record["closed"] = True

    op = types.ModuleType("dask_kubernetes.operator")
    op.make_worker_spec, op.make_cluster_spec, op.KubeCluster = make_worker_spec, make_cluster_spec, KubeCluster
    return op


def test_kubernetes_backend_adds_a_gpu_worker_group_with_the_data_volume(monkeypatch):
    record: dict = {}
    op = _fake_operator(record)
    monkeypatch.setitem(sys.modules, "dask_kubernetes", types.ModuleType("dask_kubernetes"))
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", op)
    config = cl.load_cluster_config(Path(__file__).parents[1] / "deploy" / "kubernetes" / "cluster-k8s.yaml")
    cl._kubernetes_cluster(config)
    spec = record["cluster"]["custom_cluster_spec"]
    assert spec["metadata"]["name"] == config.name and record["cluster"]["shutdown_on_close"] is True
    assert spec["spec"]["scheduler"]["spec"]["containers"][0]["args"][:2] == ["dask", "scheduler"]
    cpu = spec["spec"]["worker"]["spec"]
    assert cpu["containers"][0]["args"][:2] == ["dask", "worker"] and "GPU=1" not in cpu["containers"][0]["args"]
    (group,) = record["groups"]
    assert group["name"] == "gpu" and group["n_workers"] == config.gpu_workers
    gpu = group["custom_spec"]
    container = gpu["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["memory"] == "32Gi"
    i = container["args"].index("--resources")
    assert container["args"][i + 1] == "GPU=1"
    for pod in (cpu, gpu["spec"]):
        assert pod["volumes"] == [{"name": "data", "persistentVolumeClaim": {"claimName": "l2l-data"}}]
        assert pod["containers"][0]["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert cl._planned_resources(config) == {"GPU": 1}
    # connect: true attaches to an existing DaskCluster by name and creates nothing
    calls = []
    op.KubeCluster.from_name = classmethod(lambda cls, name, **kw: calls.append((name, kw)))
    cl._kubernetes_cluster(cl.parse_cluster_config({"kind": "kubernetes", "name": "l2l", "connect": True}))
    assert calls and calls[0][0] == "l2l"
