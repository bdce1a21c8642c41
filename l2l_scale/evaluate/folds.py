"""One fold of a cross-validation as a Dask task, and running the folds locally or on a cluster.

A fold samples patches from its training pairs, trains, restores its held-out pairs and computes their metrics
(see :mod:`l2l_scale.evaluate.crossval`). The fold datasets are *views*: folders of symbolic links to the dataset's
images (named ``IIII_KEY`` by the pair's index ``IIII`` in the dataset, so an image keeps its name, and its
sampled patches, in every fold); the dataset is never modified or copied. On a Dask worker a fold runs in a fresh
Python process (``python -m l2l_scale.evaluate.folds JOB.json``); its JSON in ``folds/`` is written only when the
fold is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from l2l_scale.errors import InputError, OutputError
from l2l_scale.evaluate.crossval_results import (
    CROSSVAL_VERSION,
    _finite,
    _fmt,
    _fold_summary,
    _write_json_atomic,
)
from l2l_scale.io.atomic import say as _say

# One fold at a time per process: Keras' global seed and graph state, and dask.config, are process-wide.
_FOLD_LOCK = threading.Lock()


def _make_view(folder: Path, entries: Sequence[Sequence[str]]) -> Path:
    """A folder dataset of symbolic links to some images of the dataset (the images are not copied)."""
    folder.mkdir(parents=True)
    for name, target, _key in entries:
        try:
            (folder / f"{name}.zarr").symlink_to(target, target_is_directory=True)
        except OSError as exc:
            raise OutputError(f"cannot create symbolic links in {folder} ({exc.strerror or exc}); crossval builds "
                              "each fold's dataset from symlinks: put OUT_DIR on a file system that supports "
                              "them") from None
    return folder


def _normalised(spec: tuple[str, str | None], q: Sequence[float], smooth: float):
    """A 2-D image normalised as ``l2l-scale evaluate`` does: its own exact whole-image percentiles, unclipped."""
    from l2l_scale.evaluate.images import load_image
    from l2l_scale.preprocess.normalize import normalize, percentiles

    img, _ = load_image(spec)
    x = img.data
    try:
        lo, hi = (float(v) for v in percentiles(x, list(q), channel_axis=None))
        out = normalize(x, lo, hi, dtype=np.float32, channel_axis=None)
    except InputError as exc:
        raise InputError(f"{spec[0]}{':' + spec[1] if spec[1] else ''}: {exc}") from None
    if smooth:
        from dask_image.ndfilters import gaussian_filter

        out = gaussian_filter(out.astype(np.float64), smooth, mode="reflect").astype(np.float32)
    return out


def _pair_metrics(source: str, restored: str, channels: dict, ev: dict) -> dict:
    """Table 1 metrics of the input and of the restoration against the reference label, on the whole image."""
    from l2l_scale.evaluate.metrics import table1_metrics

    q, smooth = ev["percentiles"], float(ev["smooth"])
    ref = _normalised((source, channels["reference"]), q, smooth)
    inp = _normalised((source, channels["input"]), q, smooth)
    res = _normalised((restored, None), q, smooth)
    with np.errstate(all="ignore"):
        return {"input": {k: _finite(v) for k, v in table1_metrics(ref, inp, data_range=1.0).items()},
                "restoration": {k: _finite(v) for k, v in table1_metrics(ref, res, data_range=1.0).items()}}


@contextlib.contextmanager
def _fold_context():
    """One fold at a time in this process, with its dask work on local threads and its chatter on stderr.

    The lock keeps Keras' global seed and dask's global config to one fold; the threaded scheduler keeps the fold's
    own computations (patch sampling, prediction, metrics) where the fold runs, instead of sending them to a
    cluster whose slots may all be taken by waiting folds; stdout stays free for the result table.
    """
    import dask

    with _FOLD_LOCK, dask.config.set(scheduler="threads"), contextlib.redirect_stdout(sys.stderr):
        yield


@contextlib.contextmanager
def _deterministic_ops():
    """TensorFlow's deterministic kernels while a fold trains on CPU, so a retrained fold equals the original.

    Adam turns float round-off differences (e.g. of multi-threaded reductions) into visibly different weights
    within a few steps. On GPUs this is left off: the U-Net's nearest-neighbour upsampling has no deterministic
    GPU gradient and TensorFlow would refuse to train.
    """
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        yield
        return
    try:  # is_/disable_op_determinism are not public; without them determinism simply stays on
        from tensorflow.python.framework import config as tf_config

        was_on = bool(tf_config.is_op_determinism_enabled())
        restore = tf_config.disable_op_determinism
    except (ImportError, AttributeError):
        was_on, restore = True, None
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if not was_on and restore is not None:
            restore()


def _run_fold(job: dict) -> dict:
    """One fold, in this process: patches from the training pairs, training, restoration and metrics of the
    held-out pairs; writes ``folds/ID.json`` when complete and returns its content."""
    from l2l_scale.config import PatchConfig, TrainConfig
    from l2l_scale.patches import create_patches
    from l2l_scale.predict import predict
    from l2l_scale.train import train

    t0 = time.perf_counter()
    with _fold_context():
        work = Path(job["work"])
        if work.exists():  # left by an interrupted run: redo the fold from scratch (training is deterministic)
            shutil.rmtree(work)
        work.mkdir(parents=True)
        train_view = _make_view(work / "train-pairs", job["train"])
        test_view = _make_view(work / "test-pairs", job["test"])
        _say(f"fold {job['id']}: training on {len(job['train'])} pairs, testing on {len(job['test'])}")
        store = create_patches(train_view, work / "patches.zarr", PatchConfig(**job["patches"]))
        cfg = TrainConfig(**{**job["train_config"], "epochs": int(job["epochs"])})
        history: list[dict] = []
        keep = ("epoch", "loss", "learning_rate")
        with _deterministic_ops():
            model = train(store, work / "model", cfg,
                          hooks=[lambda epoch, row, _m: history.append({k: row[k] for k in keep})])
        restored = predict(model, test_view, work / "restored.zarr", channels=[job["channels"]["input"]],
                           tile=job["tile"], precision=job["train_config"].get("precision", "fp32"))
        per_pair = []
        for name, source, key in job["test"]:
            metrics = _pair_metrics(source, str(restored / f"{name}.zarr"), job["channels"], job["evaluate"])
            per_pair.append({"key": key, **metrics})
        result = {
            "l2l_scale_crossval_fold": CROSSVAL_VERSION,
            "id": job["id"], "pairs": job["pairs"], "repeat": job["repeat"], "fold": job["fold"],
            "epochs": job["epochs"],
            "train_keys": [e[2] for e in job["train"]], "test_keys": [e[2] for e in job["test"]],
            "per_pair": per_pair, **_fold_summary(per_pair),
            "history": history, "seconds": round(time.perf_counter() - t0, 1),
        }
        result_path = Path(job["result"])
        result_path.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(result_path, result)  # the commit point: the fold is done only now
        if not job["keep_work"]:
            shutil.rmtree(work, ignore_errors=True)
    return result


def _in_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def _fold_task(job: dict) -> dict:
    """The Dask task of one fold: in a fresh Python process when it runs on a Dask worker, else here.

    Keras draws the seeds of its weight initialisers from Python's global ``random``, which a worker's own threads
    use too, so training inside a worker is not reproducible (and a resumed fold would differ from the original).
    A child process also hands the fold's TensorFlow memory back when the fold ends. It inherits the worker's
    environment, e.g. the GPU that dask-cuda assigned (``CUDA_VISIBLE_DEVICES``).
    """
    if not _in_dask_worker():
        return _run_fold(job)
    import subprocess

    job_file = Path(job["result"]).with_name(f".{job['id']}.job.json")
    error_file = job_file.with_name(f".{job['id']}.error.json")
    job_file.parent.mkdir(parents=True, exist_ok=True)
    error_file.unlink(missing_ok=True)
    _write_json_atomic(job_file, job)
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _FOLD_LOCK:  # one fold per worker process at a time, as in-process (set --workers for more)
        code = subprocess.call([sys.executable, "-m", "l2l_scale.evaluate.folds", str(job_file)], env=env)
    job_file.unlink(missing_ok=True)
    if code == 0:
        return json.loads(Path(job["result"]).read_text())
    if error_file.is_file():
        from l2l_scale import errors

        info = json.loads(error_file.read_text())
        error_file.unlink(missing_ok=True)
        cls = getattr(errors, info.get("type", ""), None)
        if isinstance(cls, type) and issubclass(cls, errors.L2LError):
            raise cls(f"fold {job['id']}: {info['message']}")
    raise RuntimeError(f"fold {job['id']} failed in its worker (exit code {code}); see the worker's log")


def _child_main(argv: Sequence[str]) -> int:
    """``python -m l2l_scale.evaluate.folds JOB.json``: run one fold (see :func:`_fold_task`)."""
    from l2l_scale.errors import L2LError

    job_file = Path(argv[0])
    job = json.loads(job_file.read_text())
    try:
        _run_fold(job)
    except L2LError as exc:
        _write_json_atomic(job_file.with_name(f".{job['id']}.error.json"),
                           {"type": type(exc).__name__, "message": str(exc)})
        print(f"l2l-scale crossval: fold {job['id']}: error: {exc}", file=sys.stderr)
        return 2
    return 0



def _run_jobs(jobs: list[dict]) -> None:
    """Run the fold tasks: on the distributed client if there is one (GPU-annotated), else one by one here."""
    from l2l_scale.cluster import current_client, worker_resources

    total = len(jobs)
    client = current_client()
    if client is None:
        for i, job in enumerate(jobs, 1):
            result = _fold_task(job)
            _say(f"[{i}/{total}] fold {job['id']} done in {result['seconds']:.0f} s: "
                 f"dNRMSE {_fmt(result['nrmse_rel_change'])}, dSSIM5 {_fmt(result['ssim5_rel_change'])}")
        return
    from dask import delayed
    from distributed import as_completed

    resources = {"GPU": 1} if worker_resources(client).get("GPU") else None
    tasks = [delayed(_fold_task, pure=False)(job, dask_key_name=f"crossval-fold-{job['id']}") for job in jobs]
    _say(f"submitting {total} fold(s) to the cluster" + (" (one GPU each)" if resources else ""))
    futures = client.compute(tasks, resources=resources)
    try:
        for i, fut in enumerate(as_completed(futures), 1):
            result = fut.result()
            _say(f"[{i}/{total}] fold {result['id']} done in {result['seconds']:.0f} s: "
                 f"dNRMSE {_fmt(result['nrmse_rel_change'])}, dSSIM5 {_fmt(result['ssim5_rel_change'])}")
    except BaseException:
        client.cancel(futures)
        raise



if __name__ == "__main__":  # a fold in its own process, started by _fold_task on a Dask worker
    sys.exit(_child_main(sys.argv[1:]))
