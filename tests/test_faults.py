"""Reliability with real processes: a worker killed mid-run, a full or read-only output filesystem, and two runs
writing the same output (the output lock, including a lock left behind by a killed run)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from _dask_procs import spawn, start_scheduler
from l2l_scale.errors import OutputError
from l2l_scale.io import lock as lk
from l2l_scale.io import blockwrite as bw
from l2l_scale.io.output import PROGRESS_DIR, check_output, partial_path
from l2l_scale.io.write import write_image

pytestmark = pytest.mark.timeout(600)


# ----------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from l2l_scale.model import ModelSpec, build_unet, export_model

    spec = ModelSpec(n_dim=2, n_channel_in=1, n_channel_out=1, unet_n_depth=2, unet_kern_size=3, unet_n_first=16,
                     unet_last_activation="linear", unet_residual=True, probabilistic=False, axes="YXC")
    return export_model(build_unet(spec), spec, tmp_path_factory.mktemp("m") / "model",
                        metadata={"channels": {"input": ["AC-15"]}})


def _image(path: Path, shape=(512, 512), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    data = (800 + 500 * np.sin(yy / 9.0) * np.cos(xx / 13.0))[None] + rng.poisson(200, size=(1, *shape))
    arr = xr.DataArray(data.astype(np.uint16), dims=("c", "y", "x"), coords={"c": ["AC-15"]})
    return write_image(arr, path, chunks=256)


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "l2l_scale.cli", *map(str, args)]


def _cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args), capture_output=True, text=True, **kw)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: arr[...] for name, arr in group.arrays()}


def _error_line(run: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in run.stderr.strip().splitlines() if ln.startswith("l2l-scale ")]
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1, run.stderr
    return lines[0]


# ------------------------------------------------------------------------ a worker dies in the middle of a run


@pytest.fixture
def two_workers(tmp_path):
    """`dask scheduler` + two `dask worker` processes (with nannies) on 127.0.0.1."""
    from distributed import Client

    sched_file = tmp_path / "scheduler.json"
    log = open(tmp_path / "cluster.log", "w")
    scheduler, address = start_scheduler(log, sched_file)
    procs = [scheduler]
    for name in ("w1", "w2"):
        procs.append(spawn(log, "worker", address, "--name", name, "--nthreads", "1", "--host", "127.0.0.1",
                           "--no-dashboard", "--memory-limit", "3GB"))
    # Not the default client: the reference run below must not use this cluster.
    client = Client(address, timeout="30s", set_as_default=False)
    client.wait_for_workers(2, timeout=120)
    try:
        yield address, client
    finally:
        import psutil

        client.close()
        # SIGKILL the process trees we started: a graceful worker shutdown after TensorFlow takes seconds.
        for p in procs:
            try:
                for child in psutil.Process(p.pid).children(recursive=True):
                    child.kill()
            except psutil.NoSuchProcess:
                pass
            p.kill()
            p.wait(timeout=30)
        log.close()


def test_worker_killed_mid_predict_gives_bit_identical_output(model, two_workers, tmp_path):
    address, client = two_workers
    src = _image(tmp_path / "in.zarr", (256, 320))
    common = ["--channel", "AC-15", "--tile", "64", "--chunks", "32", "--scheduler", address]
    total = (256 // 32) * (320 // 32)

    # The uninterrupted reference, on the same workers: on some CPUs (CI's) oneDNN picks other convolution
    # kernels for another thread count, which moves some pixels by 1 ulp, so this process (2 threads) cannot
    # stand in for 1-thread workers.
    ref = _cli("predict", model, src, tmp_path / "ref.zarr", *common, timeout=300)
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "out.zarr"
    progress = partial_path(out) / PROGRESS_DIR
    proc = subprocess.Popen(_cmd("predict", model, src, out, *common), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and \
                len(bw.recorded(progress, "0")) < 8:
            time.sleep(0.02)
        # SIGKILL the worker process itself (not its nanny) that is running a block right now.
        busy = [addr for addr, keys in client.processing().items() if keys]
        assert busy, "no worker was running a block; the run ended too early to test a worker loss"
        pids = client.run(os.getpid, workers=busy[:1])
        done_at_kill = len(bw.recorded(progress, "0"))
        os.kill(pids[busy[0]], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert done_at_kill < total, "the worker must be killed part-way through the run"
    assert proc.returncode == 0, stderr
    assert f"computed {total} of {total} blocks" in stdout
    # the nanny restarted the worker: two workers again, and the killed pid is gone
    client.wait_for_workers(2, timeout=60)
    assert pids[busy[0]] not in client.run(os.getpid).values()
    a, b = _arrays(tmp_path / "ref.zarr"), _arrays(out)
    assert a.keys() == b.keys() and len(a) >= 1
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=f"level {name}")


# ----------------------------------------------------------------------------- full / read-only filesystems


def _mount_tmpfs(target: Path, options: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    return run.returncode == 0


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_full_filesystem_gives_clear_error_and_leaves_input_untouched(model, tmp_path):
    """A real ENOSPC: the output goes to a 64 KiB tmpfs (root only; permissions cannot fake a full disk)."""
    src = _image(tmp_path / "in.zarr", (256, 256))
    before = _digest(src)
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "size=64k"):
        pytest.skip("needs root and mount -t tmpfs to make a really full filesystem")
    try:
        out = small / "out.zarr"
        run = _cli("predict", model, src, out, "--channel", "AC-15", "--tile", "64", "--scheduler", "threads")
        line = _error_line(run)
        assert "No space left on device" in line and "check free space" in line, line
        assert str(out) in line
        assert sorted(p.name for p in small.iterdir()) == [], "partial output and lock must be cleaned up"
    finally:
        _umount(small)
    assert _digest(src) == before


def test_read_only_output_folder_gives_clear_error(model, tmp_path):
    """As root a chmod is not enforced, so a read-only tmpfs is used; otherwise a chmod 555 folder."""
    src = _image(tmp_path / "in.zarr", (128, 128))
    before = _digest(src)
    ro = tmp_path / "ro"
    mounted = _mount_tmpfs(ro, "ro,size=64k")
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("root without mount -t tmpfs: no way to make a read-only folder here")
        ro.chmod(0o555)
    try:
        run = _cli("predict", model, src, ro / "out.zarr", "--channel", "AC-15", "--scheduler", "threads")
        line = _error_line(run)
        assert "not writable" in line and "choose a writable location" in line, line
    finally:
        if mounted:
            _umount(ro)
        else:
            ro.chmod(0o755)
    assert _digest(src) == before


# ------------------------------------------------------------------------------------ two runs, one output


def _stop_while_writing(proc: subprocess.Popen, out: Path) -> None:
    """Run ``proc`` in short slices (SIGCONT/SIGSTOP) and leave it stopped once it is writing ``out``.

    Stepping never misses the window in which the run holds the lock, however fast it is and however busy the
    machine: block completion records exist from the first finished block until just before the lock is
    released.
    """
    import psutil

    progress = partial_path(out) / PROGRESS_DIR
    ps = psutil.Process(proc.pid)
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.02)
        proc.send_signal(signal.SIGSTOP)
        try:
            while ps.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE):
                time.sleep(0.001)
        except psutil.NoSuchProcess:
            return
        if bw.recorded(progress) or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)


def test_second_run_is_refused_and_a_killed_runs_lock_is_stale(model, tmp_path):
    src = _image(tmp_path / "in.zarr", (512, 512))
    out = tmp_path / "out.zarr"
    lock = lk.lock_path(out)
    common = ["--channel", "AC-15", "--tile", "64", "--scheduler", "threads"]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_cmd("predict", model, src, out, *common), stdout=log, stderr=subprocess.STDOUT)
    try:
        _stop_while_writing(first, out)
        assert first.poll() is None and lock.exists(), "the first run must be writing"
        info = json.loads(lock.read_text())
        assert info["pid"] == first.pid and info["host"] == socket.gethostname()

        for extra in (["--overwrite"], ["--resume"]):  # the two that would touch the partial output
            line = _error_line(_cli("predict", model, src, out, *common, *extra))
            assert f"{out} is being written by another l2l-scale run (pid {first.pid} on {socket.gethostname()}, " \
                   f"started {info['started']})" in line, line
            assert f"wait for it or remove the stale lock {lock}" in line
        assert partial_path(out).exists(), "--overwrite of a live run must not delete its partial output"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        log.close()

    assert lock.exists(), "a killed run leaves its lock behind"
    resumed = _cli("predict", model, src, out, *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert out.exists() and not lock.exists() and not partial_path(out).exists()


# --------------------------------------------------------------------------------------- lock unit checks


def test_lock_contents_release_and_in_process_refusal(tmp_path):
    out = tmp_path / "x.zarr"
    with lk.OutputLock(out) as held:
        info = json.loads(held.path.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"]
        with pytest.raises(OutputError, match="being written by another l2l-scale run"):
            lk.OutputLock(out).acquire()
        with pytest.raises(OutputError, match="being written by another"):
            write_image(np.zeros((8, 8), np.uint16), out)  # every atomic writer takes the lock
        with pytest.raises(OutputError, match="being written by another"):
            check_output(out)
    assert not lk.lock_path(out).exists()
    write_image(np.zeros((8, 8), np.uint16), out)
    assert out.exists() and not lk.lock_path(out).exists()


def _write_lock(path: Path, **info) -> Path:
    path = lk.lock_path(path)
    path.write_text(json.dumps(info))
    return path


def test_stale_lock_rules(tmp_path):
    import psutil

    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = time.time()
    # same host, dead pid -> stale
    _write_lock(tmp_path / "a", pid=dead.pid, host=host, started="x", started_ts=now)
    lk.OutputLock(tmp_path / "a").acquire().release()
    # same host, pid alive but started after the lock (pid reused) -> stale
    me = psutil.Process().create_time()
    _write_lock(tmp_path / "b", pid=os.getpid(), host=host, started="x", started_ts=me - 3600)
    lk.OutputLock(tmp_path / "b").acquire().release()
    # same host, the very process -> live
    _write_lock(tmp_path / "c", pid=os.getpid(), host=host, started="x", started_ts=me + 1)
    with pytest.raises(OutputError, match=f"pid {os.getpid()} on {host}"):
        lk.OutputLock(tmp_path / "c").acquire()
    lk.lock_path(tmp_path / "c").unlink()
    # another host: live while refreshed, stale after stale_after seconds without a refresh
    p = _write_lock(tmp_path / "d", pid=1, host="node-elsewhere", started="x", started_ts=now)
    with pytest.raises(OutputError, match="node-elsewhere"):
        lk.OutputLock(tmp_path / "d", stale_after=60).acquire()
    os.utime(p, (now - 120, now - 120))
    lk.OutputLock(tmp_path / "d", stale_after=60).acquire().release()
    # an empty lock (crash between create and write): live while fresh, stale when old
    e = lk.lock_path(tmp_path / "e")
    e.write_text("")
    with pytest.raises(OutputError, match="still creating its lock"):
        lk.OutputLock(tmp_path / "e").acquire()
    os.utime(e, (now - 3600, now - 3600))
    lk.OutputLock(tmp_path / "e").acquire().release()
    assert not any(p.name.endswith((".lock", ".break")) for p in tmp_path.iterdir())


def test_lock_heartbeat_keeps_a_long_run_alive(tmp_path):
    with lk.OutputLock(tmp_path / "h", stale_after=0.4) as held:
        first = held.path.stat().st_mtime_ns
        time.sleep(0.5)
        assert held.path.stat().st_mtime_ns > first


def test_sigterm_releases_the_lock(tmp_path):
    """scancel and SLURM time limits send SIGTERM first: the lock must not outlive the run."""
    out = tmp_path / "t.zarr"
    with pytest.raises(SystemExit) as exit_:
        with lk.OutputLock(out):
            assert lk.lock_path(out).exists()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted by the handler
    assert exit_.value.code == 128 + signal.SIGTERM
    assert not lk.lock_path(out).exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ------------------------------------------------------------------- the same two checks for `l2l-scale patches`


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from l2l_scale.synthetic import write_simulation

    return write_simulation(tmp_path_factory.mktemp("pairs") / "plate.zarr", structure="actin", size=384,
                            fields=12, seed=3, chunks=128)


PATCH_ARGS = ["--input-channel", "AC-15", "--target-channel", "phalloidin", "--patch-size", "32",
              "--patches-per-image", "96", "--augment", "--percentiles", "1,99.9", "--chunk-patches", "64"]


def _patch_store(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    out = {name: group[name][...] for name in ("X", "Y")}
    out.update({f"table/{n}": a[...] for n, a in group["table"].arrays()})
    return out


@pytest.fixture(scope="module")
def patches_reference(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("pref") / "ref.zarr"
    run = _cli("patches", pairs, out, *PATCH_ARGS, "--scheduler", "threads")
    assert run.returncode == 0, run.stderr
    return _patch_store(out)


def test_client_killed_mid_patches_then_resume_is_bit_identical(pairs, patches_reference, tmp_path):
    out = tmp_path / "p.zarr"
    staging = partial_path(out) / PROGRESS_DIR / "staging"
    proc = subprocess.Popen(_cmd("patches", pairs, out, *PATCH_ARGS, "--scheduler", "threads"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(staging.glob("*.json"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(staging.glob("*.json")))
    assert 3 <= finished < 12, "the client must be killed part-way through sampling"
    assert not out.exists()
    resumed = _cli("patches", pairs, out, *PATCH_ARGS, "--scheduler", "threads", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"sampled {12 - finished} of 12 images ({finished} were already finished)" in resumed.stderr
    got = _patch_store(out)
    assert got.keys() == patches_reference.keys()
    for name, ref in patches_reference.items():
        np.testing.assert_array_equal(got[name], ref, err_msg=name)


def test_worker_killed_mid_patches_gives_bit_identical_output(pairs, patches_reference, two_workers, tmp_path):
    address, client = two_workers
    out = tmp_path / "p.zarr"
    staging = partial_path(out) / PROGRESS_DIR / "staging"
    proc = subprocess.Popen(_cmd("patches", pairs, out, *PATCH_ARGS, "--scheduler", address),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        busy = []
        while time.time() < deadline and proc.poll() is None and not busy:
            if len(list(staging.glob("*.json"))) >= 1:
                busy = [addr for addr, keys in client.processing().items()
                        if any("_image_task" in str(k) for k in keys)]
            time.sleep(0.02)
        assert busy, "no worker was sampling an image; the run ended too early to test a worker loss"
        pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
        done_at_kill = len(list(staging.glob("*.json")))
        os.kill(pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert done_at_kill < 12
    assert proc.returncode == 0, stderr
    got = _patch_store(out)
    for name, ref in patches_reference.items():
        np.testing.assert_array_equal(got[name], ref, err_msg=name)


# ------------------------------------------------------------------ the same two checks for `l2l-scale crossval`

CV_ARGS = ["--input-channel", "AC-15", "--target-channel", "phalloidin", "--folds", "2", "--pairs", "4",
           "--repeats", "2", "--epochs-per-pair", "0.5", "--steps-per-epoch", "3", "--batch-size", "8", "--loss", "l1",
           "--unet-depth", "1", "--unet-n-first", "8", "--unet-kern-size", "3", "--patch-size", "32",
           "--patches-per-image", "16", "--strategy", "none"]
CV_FOLDS = 4  # 2 repeats x 2 folds


@pytest.fixture(scope="module")
def cv_plate(tmp_path_factory):
    from l2l_scale.synthetic import write_simulation

    return write_simulation(tmp_path_factory.mktemp("cvp") / "plate.zarr", structure="actin", size=128, fields=6,
                            seed=0, chunks=128)


@pytest.fixture(scope="module")
def cv_reference(cv_plate, tmp_path_factory):
    out = tmp_path_factory.mktemp("cvref") / "cv"
    run = _cli("crossval", cv_plate, out, *CV_ARGS, "--scheduler", "threads")
    assert run.returncode == 0, run.stderr
    return json.loads((out / "crossval.json").read_text())["pairs"]


def test_client_killed_mid_crossval_then_resume_is_identical(cv_plate, cv_reference, tmp_path):
    out = tmp_path / "cv"
    proc = subprocess.Popen(_cmd("crossval", cv_plate, out, *CV_ARGS, "--scheduler", "threads"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list((out / "folds").glob("*.json"))) < 1:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list((out / "folds").glob("*.json")))
    assert 1 <= finished < CV_FOLDS, "the client must be killed part-way through the folds"
    resumed = _cli("crossval", cv_plate, out, *CV_ARGS, "--scheduler", "threads", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"trained {CV_FOLDS - finished} of {CV_FOLDS} folds ({finished} were already finished)" in resumed.stdout
    assert json.loads((out / "crossval.json").read_text())["pairs"] == cv_reference


def test_worker_killed_mid_crossval_gives_identical_results(cv_plate, cv_reference, two_workers, tmp_path):
    address, client = two_workers
    out = tmp_path / "cv"
    proc = subprocess.Popen(_cmd("crossval", cv_plate, out, *CV_ARGS, "--scheduler", address),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        busy = []
        while time.time() < deadline and proc.poll() is None and not busy:
            busy = [addr for addr, keys in client.processing().items() if keys]
            time.sleep(0.05)
        assert busy, "no worker was running a fold; the run ended too early to test a worker loss"
        time.sleep(1.0)  # let the fold get into its training
        pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
        import psutil

        for child in psutil.Process(pid).children(recursive=True):  # a fold trains in a child of the worker
            child.kill()
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert json.loads((out / "crossval.json").read_text())["pairs"] == cv_reference
