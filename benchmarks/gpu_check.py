"""Speed check for a GPU machine with any Keras backend (JAX, PyTorch or TensorFlow); prints one JSON object.

    KERAS_BACKEND=jax python benchmarks/gpu_check.py [--quick] [--size 8192] [--json OUT.json]

Run it through ``benchmarks/gpu_check.sh``, which also installs missing packages from a wheel folder (no
network). Model: the CSBDeep default architecture (depth 2, kernel 5, 32 first filters) with random weights;
image: simulated actin, written as OME-Zarr before timing. Per precision (fp32, and bf16/fp16 where the device
runs them natively):

- ``raw_mpx_s``: ``LoadedModel.predict_batch`` on in-memory tiles (batch x tile^2), no halo, no I/O;
- ``predict_mpx_s``: ``l2l_scale.predict.predict`` zarr -> zarr (normalisation statistics, halos, pyramid),
  in this process with dask's threaded scheduler, after a warm-up on a small image;
- ``predict_over_raw``: the ratio of the two;

and ``memory.peak_gb``: the accelerator's peak memory (JAX ``memory_stats``, ``torch.cuda``, TensorFlow
``get_memory_info``), or this process's peak resident memory on a CPU. ``--quick`` (CPU, CI): 256^2 image,
128^2 tiles, a few seconds of compute. ``tensorflow_imported`` says whether TensorFlow was loaded (it must not
be under JAX or PyTorch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def _device() -> tuple[str, bool]:
    """(description, is_accelerator) of the device the active backend computes on."""
    import keras

    backend = keras.config.backend()
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        return f"jax {d.platform} ({getattr(d, 'device_kind', '?')})", d.platform != "cpu"
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return f"torch cuda {torch.cuda.get_device_name(0)}", True
        return "torch cpu", False
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return (f"tensorflow {gpus[0].name}", True) if gpus else ("tensorflow cpu", False)


def _peak_memory_gb(accelerator: bool) -> dict:
    import keras

    backend = keras.config.backend()
    peak = None
    if accelerator and backend == "jax":
        import jax

        peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    elif accelerator and backend == "torch":
        import torch

        peak = torch.cuda.max_memory_allocated()
    elif accelerator:
        import tensorflow as tf

        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
    if peak is not None:
        return {"peak_gb": round(peak / 1e9, 3), "of": "accelerator"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"peak_gb": round(rss / 1e9, 3), "of": "process resident memory (no accelerator)"}


def _make_model(path: Path) -> Path:
    from l2l_scale.model import ModelSpec, build_unet, export_model

    spec = ModelSpec(unet_n_depth=2, unet_kern_size=5, unet_n_first=32)
    net = build_unet(spec, random_init=False)
    rng = np.random.default_rng(0)
    # Random but well-scaled weights, so activations neither vanish nor explode.
    net.set_weights([rng.normal(0, 1 / math.sqrt(max(1, np.prod(w.shape[:-1]))), w.shape).astype(np.float32)
                     for w in net.get_weights()])
    return export_model(net, spec, path, metadata={"channels": {"input": ["AC-15"], "output": ["phalloidin"]}})


def _make_image(path: Path, size: int) -> Path:
    import dask

    from l2l_scale.io import write_image
    from l2l_scale.synthetic import simulate

    with dask.config.set(scheduler="threads"):
        write_image(simulate("actin", size, seed=size).sel(c=["AC-15"]), path)
    return path


def _raw(model: Path, precision: str, tile: int, batch: int, reps: int) -> float:
    from l2l_scale.model import load_model

    m = load_model(model, precision=precision)
    x = np.random.default_rng(0).random((batch, tile, tile, 1), dtype=np.float32)
    m.predict_batch(x)  # compile
    t0 = time.perf_counter()
    for _ in range(reps):
        m.predict_batch(x)
    return reps * batch * tile * tile / (time.perf_counter() - t0) / 1e6


def _predict(model: Path, image: Path, warm: Path, work: Path, precision: str, tile: int, batch: int,
             size: int) -> float:
    from l2l_scale.predict import predict

    predict(model, warm, work / "warm_out.zarr", channels=["AC-15"], tile=tile, batch=batch, precision=precision,
            overwrite=True)
    out = work / f"out_{precision}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    predict(model, image, out, channels=["AC-15"], tile=tile, batch=batch, precision=precision)
    dt = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return size * size / dt / 1e6


def main() -> None:
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # progress lines of the steps; stdout carries only the JSON
        text = _run()
    print(text, file=stdout)


def _run() -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU/CI size: 256^2 image, 128^2 tiles")
    ap.add_argument("--size", type=int, default=None, help="image side (default 8192, --quick 256)")
    ap.add_argument("--tile", type=int, default=None, help="tile side (default 1024, --quick 128)")
    ap.add_argument("--batch", type=int, default=None, help="tiles per model call (default 4, --quick 2)")
    ap.add_argument("--json", help="also write the JSON here")
    ap.add_argument("--workdir", help="keep data here instead of a temporary folder")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    size = args.size or (256 if args.quick else 8192)
    tile = args.tile or (128 if args.quick else 1024)
    batch = args.batch or (2 if args.quick else 4)
    reps = 1 if args.quick else 10

    from l2l_scale.model.backend import PRECISIONS, check_backend, check_precision
    from l2l_scale.errors import ConfigError

    backend = check_backend()
    device, accelerator = _device()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model = work / "model"
    if not (model / "config.json").exists():
        _make_model(model)
    warm, image = work / "warm.zarr", work / f"actin_{size}.zarr"
    if not warm.exists():
        _make_image(warm, min(256, size))
    if not image.exists():
        _make_image(image, size)
    report: dict = {"backend": backend, "device": device, "accelerator": accelerator, "size": size, "tile": tile,
                    "batch": batch, "model": {"unet_n_depth": 2, "unet_kern_size": 5, "unet_n_first": 32},
                    "precisions": {}}
    for precision in PRECISIONS:
        try:
            check_precision(precision, accelerator=accelerator)
        except ConfigError as exc:
            report["precisions"][precision] = {"skipped": str(exc)}
            continue
        raw = _raw(model, precision, tile, batch, reps)
        pred = _predict(model, image, warm, work, precision, tile, batch, size)
        # Significant digits, not decimals: on a slow CPU MP/s is ~0.1, where 3 decimals lose 1 % of the ratio.
        report["precisions"][precision] = {"raw_mpx_s": float(f"{raw:.4g}"), "predict_mpx_s": float(f"{pred:.4g}"),
                                           "predict_over_raw": round(pred / raw, 3)}
    timed = {p: e for p, e in report["precisions"].items() if "raw_mpx_s" in e}
    if "fp32" in timed:
        for p, e in timed.items():
            e["predict_over_fp32_predict"] = round(e["predict_mpx_s"] / timed["fp32"]["predict_mpx_s"], 3)
    report["memory"] = _peak_memory_gb(accelerator)
    report["tensorflow_imported"] = "tensorflow" in sys.modules
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    return text


if __name__ == "__main__":
    main()
