"""predict against a real external Dask cluster: `dask scheduler` + two `dask worker` processes on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

from _dask_procs import spawn, start_scheduler
from l2l_scale.io.read import open_image
from l2l_scale.io.write import write_image

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler and two single-threaded workers, one of which advertises GPU=1."""
    from distributed import Client

    tmp = tmp_path_factory.mktemp("cluster")
    sched_file = tmp / "scheduler.json"
    log = open(tmp / "cluster.log", "w")
    scheduler, address = start_scheduler(log, sched_file)
    procs = [scheduler]
    for name, extra in (("gpu-worker", ["--resources", "GPU=1"]), ("cpu-worker", [])):
        procs.append(spawn(log, "worker", address, "--name", name, "--nthreads", "1", "--nworkers", "1",
                           "--host", "127.0.0.1", "--no-dashboard", "--memory-limit", "4GB", *extra))
    client = Client(address, timeout="30s")
    client.wait_for_workers(2, timeout=90)
    yield address, client
    client.close()
    for p in procs[::-1]:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def model_and_image(tmp_path_factory):
    from l2l_scale.model import ModelSpec, build_unet, export_model

    tmp = tmp_path_factory.mktemp("m")
    spec = ModelSpec(n_dim=2, n_channel_in=1, n_channel_out=1, unet_n_depth=1, unet_kern_size=3, unet_n_first=8,
                     unet_last_activation="linear", unet_residual=True, probabilistic=False, axes="YXC")
    mdir = export_model(build_unet(spec), spec, tmp / "model", metadata={"channels": {"input": ["AC-15"]}})
    rng = np.random.default_rng(3)
    data = rng.poisson(300, size=(1, 200, 330)).astype(np.uint16)
    img = write_image(xr.DataArray(data, dims=("c", "y", "x"), coords={"c": ["AC-15"]}), tmp / "in.zarr")
    return mdir, img


def test_inference_tasks_run_on_the_gpu_worker(cluster, model_and_image, tmp_path):
    from distributed import get_task_stream

    from l2l_scale.predict import predict

    address, client = cluster
    mdir, img = model_and_image
    names = {addr: w["name"] for addr, w in client.scheduler_info(n_workers=-1)["workers"].items()}
    with get_task_stream(client) as ts:
        predict(mdir, img, tmp_path / "out.zarr", tile=64, chunks=64)
    blocks = [t for t in ts.data if "_predict_block" in str(t["key"])]
    # 200 x 330 in 64^2 chunks: 15 whole blocks, and the 9 thin edge blocks pooled by shape into 3 tasks
    assert len(blocks) == 3 * 5 + 3
    assert {names[t["worker"]] for t in blocks} == {"gpu-worker"}


def test_cli_uses_an_external_scheduler(cluster, model_and_image, tmp_path):
    from l2l_scale.predict import predict

    address, _ = cluster
    mdir, img = model_and_image
    run = subprocess.run([sys.executable, "-m", "l2l_scale.cli", "predict", str(mdir), str(img),
                          str(tmp_path / "ext.zarr"), "--channel", "AC-15", "--tile", "64", "--scheduler", address],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "Dask dashboard:" in run.stderr
    local = predict(mdir, img, tmp_path / "local.zarr", channels=["AC-15"], tile=64)  # the Python API
    np.testing.assert_array_equal(open_image(tmp_path / "ext.zarr").values, open_image(local).values)


def test_waves_start_small_and_double_while_the_client_keeps_planning(cluster, monkeypatch):
    """Workers get tasks after the first few units are planned, not after a whole 20,000-task wave."""
    import operator

    from dask import delayed

    from l2l_scale.cluster import compute_waves

    _, client = cluster
    planned, waves = [], []
    compute = client.compute

    def recording(tasks, **kwargs):
        waves.append((len(tasks), len(planned)))
        return compute(tasks, **kwargs)

    monkeypatch.setattr(client, "compute", recording)

    def units():
        for u in range(10):
            planned.append(u)
            yield [delayed(operator.add, pure=False)(3 * u, k) for k in range(3)]  # importable by the workers

    assert compute_waves(units(), "test", n_units=10) == 30
    # Two single-threaded workers: the first wave stops at 2 x 2 tasks (two units of three), then 8, then 16.
    assert waves == [(6, 2), (9, 5), (15, 10)]
