"""Input pipeline throughput vs training consumption.

Builds a patch store from simulated actin (``l2l-scale patches``'s code path: 128^2 patches, augmentation,
zarr chunks of 256 patches), then measures on this machine:

* ``delivered``: patches per second that :func:`l2l_scale.train.patch_dataset` delivers (shuffled training
  split, batch 16, prefetch), iterated on its own;
* ``consumed``: patches per second that one training step of the default CARE network (depth 2, kernel 5,
  32 first filters, 128^2 patches, batch 16, L1, Adam) processes, fed from memory.

The pipeline must deliver at least 3x what training consumes, so it never starves the accelerator. Prints JSON
with both figures, the ratio and ``meets_target``; ``--json OUT`` also writes it to a file.

Usage::

    python benchmarks/bench_input.py [--json OUT] [--fields 4] [--steps 6] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's l2l_scale, not an installed one
from _common import emit  # noqa: E402

TARGET_RATIO = 3.0
BATCH = 16
PATCH = 128


def _make_store(base: Path, fields: int) -> Path:
    from l2l_scale.io.write import write_plate
    from l2l_scale.patches import create_patches
    from l2l_scale.synthetic import simulate

    plate = base / "plate.zarr"
    write_plate({f"A/1/{i}": simulate("actin", 1024, seed=i) for i in range(fields)}, plate)
    return create_patches(plate, base / "patches.zarr", preset="actin", patch_size=PATCH, patches_per_image=512,
                          split_by="patch")


def _delivered(store: Path, n_batches: int) -> dict:
    from l2l_scale.train import patch_dataset

    ds = patch_dataset(store, "train", batch_size=BATCH, shuffle=True, repeat=True, seed=0)
    it = iter(ds)
    for _ in range(5):  # warm-up: open zarr, fill the shuffle buffer and the prefetch queue
        next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        x, y = next(it)
        _ = x.shape, y.shape
    dt = time.perf_counter() - t0
    return {"patches_per_second": n_batches * BATCH / dt, "batches": n_batches, "seconds": dt}


def _consumed(steps: int) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from l2l_scale.model import ModelSpec, build_unet
    from l2l_scale.model.losses import loss_spec, make_loss
    from l2l_scale.train import _make_steps

    keras.utils.set_random_seed(0)
    spec = ModelSpec(unet_n_depth=2, unet_kern_size=5, unet_n_first=32)
    model = build_unet(spec)
    opt = keras.optimizers.Adam(2e-4)
    model.compile(optimizer=opt, loss="mae")
    opt.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, PATCH, PATCH, 1), dtype=np.float32)
    ds = tf.data.Dataset.from_tensors((x, x)).repeat()  # from memory: training cost only
    train_step, _ = _make_steps(model, opt, make_loss(loss_spec("l1")), tf.distribute.get_strategy(), BATCH)
    it = iter(ds)
    for _ in range(2):  # trace and warm up
        float(train_step(it))
    t0 = time.perf_counter()
    for _ in range(steps):
        float(train_step(it))
    dt = time.perf_counter() - t0
    return {"patches_per_second": steps * BATCH / dt, "steps": steps, "seconds": dt,
            "network": "CARE depth 2, kernel 5, 32 filters, 128^2, batch 16, L1, Adam"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the result to this file")
    ap.add_argument("--fields", type=int, default=4, help="simulated 1024^2 fields (512 patches each)")
    ap.add_argument("--steps", type=int, default=6, help="timed training steps")
    ap.add_argument("--batches", type=int, default=200, help="timed input batches")
    ap.add_argument("--keep", help="build the patch store in this folder and keep it")
    args = ap.parse_args(argv)

    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        store = base / "patches.zarr"
        if not store.exists():
            store = _make_store(base, args.fields)
        build = time.perf_counter() - t0
        delivered = _delivered(store, args.batches)
        consumed = _consumed(args.steps)
    ratio = delivered["patches_per_second"] / consumed["patches_per_second"]
    result = {
        "benchmark": "input pipeline vs training step",
        "delivered_patches_per_second": round(delivered["patches_per_second"], 1),
        "consumed_patches_per_second": round(consumed["patches_per_second"], 2),
        "ratio": round(ratio, 1),
        "target_ratio": TARGET_RATIO,
        "meets_target": bool(ratio >= TARGET_RATIO),
        "details": {"delivered": delivered, "consumed": consumed, "store_build_seconds": round(build, 1),
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "tensorflow": tf.__version__,
                                "gpus": len(tf.config.list_physical_devices("GPU"))}},
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
