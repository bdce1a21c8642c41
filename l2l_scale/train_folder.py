"""The training folder: checkpoints and their commit record, history, TensorBoard logs, the exported model.

After every epoch the chief writes ``MODEL_DIR/checkpoints/epoch-NNNN.weights.h5`` (a Keras weights file holding
the network *and* the optimiser state: Adam moments, iteration count, learning rate), ``best-NNNN.npz`` when the
monitored loss improved, and then ``state.json`` (epoch, history, best epoch, ReduceLROnPlateau and early-stopping
counters), which is the commit point. ``resume=True`` rebuilds the network, loads the last checkpoint and
continues with the next epoch. Every epoch draws its batches from a stream seeded by (seed, epoch), so a resumed
run sees the batches an uninterrupted run would have, and on one device its weights come out bit-identical
(``tests/test_train.py``). For multi-worker training ``MODEL_DIR`` must be on a file system that every worker
can read.

Progress: one log line per epoch, ``MODEL_DIR/logs/history.csv``, and TensorBoard scalars in
``MODEL_DIR/logs/tensorboard`` when the ``tensorboard`` package is installed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from l2l_scale.config import TrainConfig
from l2l_scale.errors import ConfigError, OutputError
from l2l_scale.io.atomic import say as _say, write_json

CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
STATE_FILE = "state.json"
HISTORY_FILE = "history.csv"
# Keys that fix what the weights mean: a resumed run must keep them.
_FIXED_KEYS = ("unet_n_depth", "unet_kern_size", "unet_n_first", "unet_residual", "unet_last_activation", "loss",
               "ssim_weights", "ssim_filter_size", "ssim_filter_sigma", "ssim_max_val")


def _prepare_dir(model_dir: Path, resume: bool, overwrite: bool, chief: bool, cfg_d: dict,
                 patches: Path) -> dict | None:
    """Check the model folder against resume/overwrite and return the saved state to resume from (or None)."""
    from l2l_scale.model.spec import CONFIG_FILE

    state_path = model_dir / CHECKPOINT_DIR / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    finished = (model_dir / CONFIG_FILE).is_file()
    if resume:
        if state is None:
            raise OutputError(f"{model_dir}: no checkpoint to resume from ({state_path} is missing); start without "
                              "--resume")
        changed = [k for k in _FIXED_KEYS if state["config"].get(k) != cfg_d.get(k)]
        if changed:
            raise ConfigError(f"{model_dir}: the checkpoint was trained with different {', '.join(changed)}; resume "
                              "with the same network and loss, or start again with --overwrite")
        if chief and state.get("patches") != str(patches.resolve()):
            _say(f"warning: the checkpoint was trained on {state.get('patches')}; continuing on {patches}")
        if state["epoch"] >= cfg_d["epochs"] and finished:
            raise ConfigError(f"{model_dir}: training already finished {state['epoch']} epochs; pass a larger "
                              "--epochs to continue training, or --overwrite to start again")
        return state
    if not chief:
        return None
    if model_dir.exists() and not model_dir.is_dir():
        raise OutputError(f"model output {model_dir} is a file; choose a folder path")
    if model_dir.is_dir() and any(model_dir.iterdir()):
        if not overwrite:
            if finished:
                raise OutputError(f"{model_dir} already holds a trained model; pass --overwrite to replace it (or "
                                  "--resume with a larger --epochs to train it further), or choose a new folder")
            if state is not None:
                raise OutputError(f"{model_dir} holds an interrupted training run (epoch {state['epoch']}); pass "
                                  "--resume to continue it or --overwrite to start again")
            raise OutputError(f"{model_dir} is not empty; choose a new folder, or pass --overwrite to train into it")
        from l2l_scale.model.spec import METADATA_FILE, WEIGHTS_BEST, WEIGHTS_LAST

        for name in (CHECKPOINT_DIR, LOG_DIR):
            shutil.rmtree(model_dir / name, ignore_errors=True)
        for name in (CONFIG_FILE, WEIGHTS_BEST, WEIGHTS_LAST, METADATA_FILE):
            (model_dir / name).unlink(missing_ok=True)
    parent = model_dir.resolve().parent
    if not parent.exists():
        raise OutputError(f"{parent}: output folder does not exist; create it first")
    return None


def _commit_epoch(ckpt_dir: Path, model: Any, epoch: int, improved: bool, best_file: str | None,
                  state: dict) -> str | None:
    """Write epoch ``epoch``'s checkpoint (and its weights as the best when ``improved``), then ``state.json``.

    ``state.json`` is the commit point, so older checkpoints are deleted only after it. Returns the file name of
    the best weights.
    """
    ckpt = f"epoch-{epoch:04d}.weights.h5"
    tmp = ckpt_dir / f".tmp-{ckpt}"
    model.save_weights(str(tmp))
    os.replace(tmp, ckpt_dir / ckpt)
    if improved:
        new_best = f"best-{epoch:04d}.npz"
        np.savez(ckpt_dir / f".tmp-{new_best}", *model.get_weights())
        os.replace(ckpt_dir / f".tmp-{new_best}", ckpt_dir / new_best)
        best_file = new_best
    write_json(ckpt_dir / STATE_FILE, {"epoch": epoch, "checkpoint": ckpt, "best_weights": best_file, **state})
    for old in ckpt_dir.iterdir():
        if old.name.startswith(("epoch-", "best-")) and old.name not in (ckpt, best_file):
            old.unlink(missing_ok=True)
    return best_file


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except Exception:  # ImportError, or a broken install: never let it stop training
        return False
    return True


class _TensorBoard:
    """Per-epoch scalars through ``tf.summary`` when tensorboard is installed; silently off otherwise."""

    def __init__(self, logdir: Path, enabled: bool):
        self.writer = None
        if not enabled:
            return
        if not _has_tensorboard():
            _say("note: tensorboard is not installed; TensorBoard logs are skipped (history.csv is written)")
            return
        try:
            import tensorflow as tf

            self.writer = tf.summary.create_file_writer(str(logdir))
        except Exception as exc:  # pragma: no cover - depends on the installation
            _say(f"note: TensorBoard logging is off ({type(exc).__name__}: {exc})")

    def write(self, epoch: int, values: dict) -> None:
        if self.writer is None:
            return
        try:
            import tensorflow as tf

            with self.writer.as_default(step=epoch):
                for k, v in values.items():
                    if v is not None and math.isfinite(v):
                        tf.summary.scalar(k, v)
            self.writer.flush()
        except Exception as exc:  # pragma: no cover - never break training for a log
            _say(f"note: TensorBoard logging stopped ({type(exc).__name__}: {exc})")
            self.writer = None


def _write_history(path: Path, history: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    cols = ["epoch", "loss", "val_loss", "learning_rate", "seconds", "best"]
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in cols})
    os.replace(tmp, path)


def _export(model: Any, spec: Any, model_dir: Path, cfg: TrainConfig, loss_spec: Any, best_file: str | None,
            meta: dict) -> None:
    """Export the CSBDeep model folder: the best epoch's weights as ``weights_best.h5``, CSBDeep's ``train_*``."""
    from l2l_scale.model import export_model

    ckpt_dir = model_dir / CHECKPOINT_DIR
    best_weights = None
    if best_file and (ckpt_dir / best_file).is_file():
        with np.load(ckpt_dir / best_file) as npz:
            best_weights = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    train_params = {"train_epochs": cfg.epochs, "train_steps_per_epoch": cfg.steps_per_epoch,
                    "train_learning_rate": cfg.learning_rate, "train_batch_size": cfg.batch_size,
                    "train_tensorboard": bool(cfg.tensorboard),
                    "train_reduce_lr": {"factor": cfg.reduce_lr_factor, "patience": cfg.reduce_lr_patience,
                                        "min_delta": cfg.reduce_lr_min_delta} if cfg.reduce_lr else None,
                    **({"train_loss": {"l1": "mae", "l2": "mse"}[loss_spec.name]}
                       if loss_spec.name in ("l1", "l2") else {})}
    export_model(model, spec, model_dir, metadata=meta, weights_best=best_weights, train_params=train_params,
                 overwrite=True)


def _metadata(store, cfg: TrainConfig, loss_spec, info: dict, history: list, best: dict, stopped_early: bool,
              patches: Path, command: str | None) -> dict:
    from l2l_scale.io.prov import provenance

    norm = store.meta.get("normalization") or {}
    return {
        "channels": store.channels,
        "normalization": {"percentiles": norm.get("percentiles"), "values": norm.get("values"),
                          "scope": norm.get("scope"), "formula": norm.get("formula")},
        "loss": loss_spec.to_dict(),
        "preset": cfg.preset,
        "mode": store.meta.get("mode"),
        "provenance": provenance(
            cfg.model_dump(mode="json"), str(patches.resolve()), command=command,
            patches={"path": str(patches.resolve()), "n_train": store.n_train, "n_validation": store.n_validation,
                     "patch_size": store.patch_size, "mode": store.meta.get("mode"),
                     "augment": store.meta.get("augment"), "split": store.meta.get("split"),
                     "source": store.provenance.get("input"), "created": store.provenance.get("created")},
            training={"strategy": info["name"], "replicas": info["replicas"], "workers": info["workers"],
                      "global_batch": cfg.batch_size, "epochs_trained": len(history),
                      "best_epoch": best["epoch"], "best_value": best["value"],
                      "monitor": "val_loss" if store.n_validation else "loss", "stopped_early": stopped_early,
                      "final": history[-1] if history else None}),
    }
