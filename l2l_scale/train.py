"""Train a CARE U-Net on a patch store with ``tf.distribute``: one GPU, several GPUs, or several machines.

``l2l-scale train PATCHES MODEL_DIR`` builds the CARE U-Net (:func:`l2l_scale.model.build_unet`, CSBDeep's layer
graph), trains it with Adam on the patch store's training rows, monitors the validation rows, and exports a
CSBDeep model folder (:func:`l2l_scale.model.export_model`) with ``weights_best.h5`` chosen by validation loss.

Distribution
------------
``strategy="auto"`` uses ``tf.distribute.MirroredStrategy`` over all visible GPUs, or no strategy without a GPU;
``"mirrored"`` forces it (over all logical CPU devices when there is no GPU); ``"multiworker"`` reads
``TF_CONFIG`` and uses ``MultiWorkerMirroredStrategy``. ``batch_size`` is the global batch: each replica gets
``batch_size / replicas``. The network and the optimiser are built (and compiled) inside ``strategy.scope()``.

The training step is a small custom loop (``strategy.run`` inside a ``tf.function``), not ``keras.Model.fit``:
Keras 3's ``fit`` fails under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585: its symbolic build reduces
a ``PerReplica`` batch), and CSBDeep's ``CARE.train`` is not strategy-aware at all. The loop uses only public
APIs and behaves the same under every strategy: the per-sample loss is summed on each replica and divided by the
global batch, Keras' optimiser all-reduces (sums) the gradients, so the update equals a single device's on the
same global batch. Each epoch's steps run in one call of that ``tf.function`` (a ``tf.range`` loop, what Keras'
``steps_per_execution`` does), so the host synchronises once per epoch rather than once per step.

:func:`patch_dataset` (:mod:`l2l_scale.train_input`) reads the patch store chunk by chunk; the training folder
(checkpoints, ``state.json``, history, the exported model) is written by :mod:`l2l_scale.train_folder`. After every
epoch the chief commits a checkpoint with the optimiser state, so ``resume=True`` continues where a run stopped,
bit-identically on one device. For multi-worker training ``MODEL_DIR`` must be on a file system that every worker
can read.

Progress: one log line per epoch, ``MODEL_DIR/logs/history.csv``, and TensorBoard scalars in
``MODEL_DIR/logs/tensorboard`` when the ``tensorboard`` package is installed.

A NaN or infinite loss stops training at the end of its epoch, before any checkpoint of it is written; the last
good checkpoint stays in place and a :class:`TrainingDivergedError` names the first bad step and says what to
try.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from l2l_scale.config import TrainConfig, train_config
from l2l_scale.errors import ConfigError, InputError
from l2l_scale.io.atomic import say as _say
from l2l_scale.train_folder import (
    CHECKPOINT_DIR,
    HISTORY_FILE,
    LOG_DIR,
    _commit_epoch,
    _export,
    _metadata,
    _prepare_dir,
    _TensorBoard,
    _write_history,
)
from l2l_scale.train_input import _distributed, _one_device, patch_dataset

__all__ = ["TrainingDivergedError", "patch_dataset", "select_strategy", "train"]


class TrainingDivergedError(ConfigError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


# -------------------------------------------------------------------------------------------------- strategy


def _tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ConfigError("--strategy multiworker needs the TF_CONFIG environment variable on every worker "
                          "(cluster addresses and this worker's task); set it, or use --strategy mirrored for one "
                          "machine")
    try:
        cfg = json.loads(raw)
        workers = cfg["cluster"]["worker"]
        task = cfg["task"]
        task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError("TF_CONFIG is not valid: it must be JSON like {\"cluster\": {\"worker\": [\"host1:port\", "
                          "\"host2:port\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}; fix it on every "
                          "worker") from None
    if not isinstance(workers, list) or not workers:
        raise ConfigError("TF_CONFIG lists no workers under cluster.worker; list every worker's host:port")
    return cfg


def select_strategy(name: str = "auto") -> tuple[Any, dict]:
    """Create the ``tf.distribute`` strategy for ``name``; call it before any other TensorFlow operation.

    Parameters
    ----------
    name : {"auto", "mirrored", "multiworker", "none"}

    Returns
    -------
    strategy : tf.distribute.Strategy
    info : dict
        ``name`` (class name), ``replicas``, ``workers``, ``chief`` (this process writes outputs), ``devices``.

    Raises
    ------
    ConfigError
        Unknown name, or ``multiworker`` without a valid ``TF_CONFIG``.
    """
    if name not in ("auto", "mirrored", "multiworker", "none"):
        raise ConfigError(f"unknown strategy {name!r}; use auto, mirrored, multiworker or none")
    tf_config = _tf_config() if name == "multiworker" else None
    import tensorflow as tf

    workers, chief = 1, True
    if name == "multiworker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        cluster = tf_config["cluster"]
        task = tf_config["task"]
        workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
        chief = task["type"] == "chief" or (task["type"] == "worker" and int(task["index"]) == 0
                                            and not cluster.get("chief"))
    else:
        gpus = tf.config.list_logical_devices("GPU")
        if name == "mirrored" or (name == "auto" and gpus):
            devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
            # NCCL needs GPUs; CPU replicas reduce through one device.
            ops = None if gpus else tf.distribute.ReductionToOneDevice()
            strategy = tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=ops)
        else:
            strategy = tf.distribute.get_strategy()
    try:
        devices = [str(d) for d in strategy.extended.worker_devices]
    except RuntimeError:  # the default strategy has no device list
        devices = []
    if name == "multiworker":
        label = "MultiWorkerMirroredStrategy"
    elif isinstance(strategy, tf.distribute.MirroredStrategy):
        label = "MirroredStrategy"
    else:
        label = "no strategy (one device)"
    return strategy, {"name": label, "replicas": int(strategy.num_replicas_in_sync),
                      "workers": workers, "chief": chief, "devices": devices}


# ----------------------------------------------------------------------------------------------- the loop


def _make_steps(model, optimizer, loss_fn, strategy, global_batch: int):
    """Graph-compiled training and validation loops over ``n`` batches of an iterator.

    ``train_steps(it, n)`` returns the sum of the ``n`` global-batch mean losses, and the index (-1 if none) and
    value of the first non-finite one; ``eval_steps(it, n)`` returns (loss sum, patch count).
    """
    import tensorflow as tf

    scale = 1.0 / float(global_batch)
    variables = model.trainable_variables

    def replica_train(x, y):
        with tf.GradientTape() as tape:
            per_sample = loss_fn(y, model(x, training=True))
            # Summed per replica and divided by the *global* batch: the all-reduced (summed) gradient is then the
            # gradient of the global-batch mean, whatever the replica count.
            loss = tf.reduce_sum(per_sample) * scale
            # fp16: the LossScaleOptimizer scales the loss up here (inside the tape) and the gradients back down
            # in apply_gradients, skipping steps that overflow; every other optimiser returns the loss unchanged.
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    def replica_eval(x, y):
        # (sum, count): a last, smaller validation batch then weighs by its patches, as in Keras' fit.
        per_sample = loss_fn(y, model(x, training=False))
        return tf.reduce_sum(per_sample), tf.cast(tf.shape(per_sample)[0], per_sample.dtype)

    # Several steps per call, as Keras' steps_per_execution: one Python dispatch and one host sync per call
    # rather than per step. A per-step sync idles a GPU between small steps; on 2 CPU cores the gain is in the noise.
    @tf.function
    def train_steps(iterator, n):
        total, bad, bad_loss = tf.constant(0.0, tf.float32), tf.constant(-1, tf.int32), tf.constant(0.0, tf.float32)
        for i in tf.range(n):
            x, y = next(iterator)
            loss = tf.cast(strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_train, args=(x, y)),
                                           axis=None), tf.float32)
            first = (bad < 0) & ~tf.math.is_finite(loss)  # the first step that diverged, and its loss
            bad, bad_loss = tf.where(first, i, bad), tf.where(first, loss, bad_loss)
            total += loss
        return total, bad, bad_loss

    @tf.function
    def eval_steps(iterator, n):
        total, count = tf.constant(0.0, tf.float32), tf.constant(0.0, tf.float32)
        for _ in tf.range(n):
            x, y = next(iterator)
            s, c = strategy.run(replica_eval, args=(x, y))
            total += tf.cast(strategy.reduce(tf.distribute.ReduceOp.SUM, s, axis=None), tf.float32)
            count += tf.cast(strategy.reduce(tf.distribute.ReduceOp.SUM, c, axis=None), tf.float32)
        return total, count

    return train_steps, eval_steps


def _spec_for(cfg: TrainConfig, store) -> Any:
    from l2l_scale.model import ModelSpec

    n_in, n_out = int(store.X.shape[-1]), int(store.Y.shape[-1])
    residual = cfg.unet_residual if cfg.unet_residual is not None else n_in == n_out
    if residual and n_in != n_out:
        raise ConfigError(f"a residual U-Net needs as many input as output channels ({n_in} != {n_out}); drop "
                          "--residual")
    return ModelSpec(n_channel_in=n_in, n_channel_out=n_out, unet_n_depth=cfg.unet_n_depth,
                     unet_kern_size=cfg.unet_kern_size, unet_n_first=cfg.unet_n_first,
                     unet_last_activation=cfg.unet_last_activation, unet_residual=bool(residual))


def _check_store(store, cfg: TrainConfig) -> None:
    from l2l_scale.model.losses import check_patch_size

    if store.n_train == 0:
        raise InputError(f"patch store {store.path} is empty (no training patches); recreate it with 'l2l-scale "
                         "patches' (more --patches-per-image, or a lower --validation-fraction)")
    grid = 2**cfg.unet_n_depth
    if store.patch_size % grid:
        raise ConfigError(f"patch size {store.patch_size} is not a multiple of the U-Net grid {grid} "
                          f"(2**depth); recreate the patches with a multiple of {grid} or lower --unet-depth")
    check_patch_size(cfg.loss_spec(), store.patch_size)


def _check_batch(batch: int, replicas: int) -> int:
    if batch < replicas:
        raise ConfigError(f"batch size {batch} is smaller than the {replicas} replicas; use --batch-size "
                          f"{replicas} or more (a multiple of {replicas})")
    if batch % replicas:
        lower, upper = batch // replicas * replicas, (batch // replicas + 1) * replicas
        raise ConfigError(f"batch size {batch} is not a multiple of the {replicas} replicas; use --batch-size "
                          f"{lower} or {upper}")
    return batch // replicas


def train(patches: str | Path, model_dir: str | Path, config: TrainConfig | str | Path | None = None, *,
          resume: bool = False, overwrite: bool = False,
          hooks: Sequence[Callable[[int, dict, Any], None]] = (), command: str | None = None,
          **values: Any) -> Path:
    """Train a CARE U-Net on a patch store and export a CSBDeep model folder.

    Parameters
    ----------
    patches : path
        Patch store from :func:`l2l_scale.patches.create_patches`.
    command : str, optional
        The command line for the output's provenance (default: this process's; the CLI passes its own).
    model_dir : path
        Output model folder: ``config.json``, ``weights_best.h5``, ``weights_last.h5``, ``l2l_scale.json``
        (loadable by ``csbdeep.models.CARE(None, name, basedir)``), plus ``checkpoints/`` and ``logs/``.
    config : TrainConfig, path or None
        Settings, or a YAML file; ``**values`` override single settings (see :func:`l2l_scale.config.train_config`,
        e.g. ``preset="actin"``, ``epochs=2``, ``loss="ms-ssim3"``, ``strategy="mirrored"``).
    resume : bool
        Continue from the last checkpoint in ``model_dir`` (network, optimiser state, schedule, history).
    overwrite : bool
        Replace a model or an interrupted run in ``model_dir``.
    hooks : sequence of callables
        ``hook(epoch, logs, keras_model)`` called after each epoch's checkpoint (for tests and integrations).

    Returns
    -------
    Path
        ``model_dir``.

    Raises
    ------
    InputError
        Missing or empty patch store.
    ConfigError
        Invalid settings, a loss that does not fit the patches, a batch size that does not fit the replicas,
        ``multiworker`` without ``TF_CONFIG``.
    TrainingDivergedError
        The loss became NaN/Inf (the last good checkpoint is kept).
    OutputError
        ``model_dir`` holds a model or an interrupted run (without ``overwrite``/``resume``).
    """
    from l2l_scale.patches import open_patches

    if isinstance(config, TrainConfig):
        cfg = config.model_copy(update={k: v for k, v in values.items() if v is not None}) if values else config
        cfg = TrainConfig(**cfg.model_dump())  # re-validate the updated copy
    else:
        cfg = train_config(config, **values)
    model_dir = Path(model_dir)
    store = open_patches(patches)
    _check_store(store, cfg)
    spec = _spec_for(cfg, store)
    loss_spec = cfg.loss_spec()
    from l2l_scale.model.backend import backend_name, check_precision

    if backend_name() != "tensorflow":
        raise ConfigError(f"training runs on TensorFlow (tf.distribute), but KERAS_BACKEND={backend_name()}; unset "
                          "KERAS_BACKEND for 'l2l-scale train' (JAX and PyTorch run predict only)")
    # The strategy must exist before any other TensorFlow operation (multi-worker collectives, logical devices).
    strategy, info = select_strategy(cfg.strategy)
    import tensorflow as tf

    check_precision(cfg.precision, accelerator=bool(tf.config.list_logical_devices("GPU")))
    per_replica = _check_batch(cfg.batch_size, info["replicas"])
    cfg_d = cfg.model_dump(mode="json")
    state = _prepare_dir(model_dir, resume, overwrite, info["chief"], cfg_d, Path(patches))
    ckpt_dir, log_dir = model_dir / CHECKPOINT_DIR, model_dir / LOG_DIR
    if info["chief"]:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)

    import keras

    from l2l_scale.model import build_unet
    from l2l_scale.model.losses import make_loss

    keras.utils.set_random_seed(cfg.seed)
    loss_fn = make_loss(loss_spec)
    with strategy.scope():
        model = build_unet(spec, cfg.precision)
        optimizer = keras.optimizers.Adam(learning_rate=cfg.learning_rate)
        if cfg.precision == "fp16":  # fp16 gradients underflow without loss scaling (bf16 has fp32's range)
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(optimizer=optimizer, loss=loss_fn, jit_compile=False)  # the model owns the optimiser state
        optimizer.build(model.trainable_variables)
    start_epoch = 0
    history: list[dict] = []
    best = {"epoch": None, "value": math.inf}
    plateau = {"best": math.inf, "wait": 0}
    early = {"best": math.inf, "wait": 0}
    best_file: str | None = None
    if state is not None:
        model.load_weights(str(ckpt_dir / state["checkpoint"]))
        start_epoch = int(state["epoch"])
        history, best, plateau, early = state["history"], state["best"], state["plateau"], state["early"]
        best_file = state.get("best_weights")
        _say(f"resuming {model_dir} after epoch {start_epoch} (learning rate "
             f"{float(keras.ops.convert_to_numpy(optimizer.learning_rate)):.3g})")

    monitor = "val_loss" if store.n_validation > 0 else "loss"
    if monitor == "loss":
        _say("warning: the patch store has no validation patches; the best weights are chosen by training loss")

    # Every epoch's batches are seeded by (seed, epoch) rather than reshuffled from one start: that is what makes
    # resuming exact. One iterator serves all remaining epochs (see _epoch_stream).
    span = dict(first_epoch=start_epoch, epochs=cfg.epochs, seed=cfg.seed)
    train_it = iter(_distributed(strategy, info, store, "train", cfg.batch_size, steps=cfg.steps_per_epoch,
                                 shuffle_buffer=cfg.shuffle_buffer, **span))
    val_steps = 0
    if store.n_validation:
        whole = _one_device(strategy, info)
        per_pass = -(-store.n_validation // cfg.batch_size) if whole else store.n_validation // cfg.batch_size
        val_steps = (min(cfg.validation_batches or per_pass, per_pass) if whole
                     else cfg.validation_batches or max(1, per_pass))
        val_it = iter(_distributed(strategy, info, store, "validation", cfg.batch_size, steps=val_steps, **span))
    train_steps, eval_steps = _make_steps(model, optimizer, loss_fn, strategy, cfg.batch_size)
    board = _TensorBoard(log_dir / "tensorboard", cfg.tensorboard and info["chief"])

    if info["chief"]:
        _say(f"training {model_dir.name}: {store.n_train} training / {store.n_validation} validation patches of "
             f"{store.patch_size}x{store.patch_size} px, loss {loss_spec.name}, {info['name']}: per-replica batch "
             f"{per_replica} x {info['replicas']} replica(s) = global batch {cfg.batch_size}; "
             f"{cfg.steps_per_epoch} steps x {cfg.epochs} epochs, learning rate {cfg.learning_rate:g}")

    def lr_now() -> float:
        return float(keras.ops.convert_to_numpy(optimizer.learning_rate))

    stopped_early = False
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        total, bad, bad_loss = (float(v) for v in train_steps(train_it, tf.constant(cfg.steps_per_epoch, tf.int32)))
        if bad >= 0:
            kept = (f"the last good checkpoint (epoch {history[-1]['epoch']}) is kept in {ckpt_dir}" if history
                    else "no checkpoint was written yet")
            raise TrainingDivergedError(
                f"training diverged: the loss is {bad_loss} at epoch {epoch + 1}, step {int(bad) + 1}; {kept}; lower "
                f"the learning rate (e.g. --learning-rate {cfg.learning_rate / 10:g}) and rerun"
                + (" with --resume" if history else "") + ", or check the patches for NaN values")
        loss = total / cfg.steps_per_epoch
        val_loss = None
        if val_steps:
            # Each epoch of the validation stream is the same pass over the same validation patches.
            val_sum, val_n = (float(v) for v in eval_steps(val_it, tf.constant(val_steps, tf.int32)))
            val_loss = val_sum / max(val_n, 1.0)
            if not math.isfinite(val_loss):
                raise TrainingDivergedError(
                    f"training diverged: the validation loss is {val_loss} at epoch {epoch + 1}; the last good "
                    f"checkpoint is kept in {ckpt_dir}; lower the learning rate (e.g. --learning-rate "
                    f"{cfg.learning_rate / 10:g}) and rerun with --resume, or check the patches for NaN values")
        current = val_loss if monitor == "val_loss" else loss
        lr = lr_now()
        improved = current < best["value"]
        if improved:
            best = {"epoch": epoch + 1, "value": current}
        # ReduceLROnPlateau as in CARE (Keras semantics, mode "min"): reduce after `patience` epochs without an
        # improvement larger than min_delta.
        if cfg.reduce_lr:
            if current < plateau["best"] - cfg.reduce_lr_min_delta:
                plateau = {"best": current, "wait": 0}
            else:
                plateau["wait"] += 1
                if plateau["wait"] >= cfg.reduce_lr_patience:
                    optimizer.learning_rate = lr * cfg.reduce_lr_factor
                    plateau["wait"] = 0
                    if info["chief"]:
                        _say(f"reducing the learning rate to {lr * cfg.reduce_lr_factor:.3g}")
        if cfg.early_stopping:
            if current < early["best"]:
                early = {"best": current, "wait": 0}
            else:
                early["wait"] += 1
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "loss": loss, "val_loss": val_loss, "learning_rate": float(f"{lr:.6g}"),
               "seconds": round(seconds, 3), "best": improved}
        history.append(row)
        if info["chief"]:
            best_file = _commit_epoch(ckpt_dir, model, epoch + 1, improved, best_file, {
                "history": history, "best": best, "plateau": plateau, "early": early, "monitor": monitor,
                "config": cfg_d, "patches": str(Path(patches).resolve()), "strategy": info["name"],
                "replicas": info["replicas"]})
            _write_history(log_dir / HISTORY_FILE, history)
            board.write(epoch + 1, {"loss": loss, "val_loss": val_loss, "learning_rate": lr})
            _say(f"epoch {epoch + 1}/{cfg.epochs}  loss {loss:.5f}" +
                 (f"  val_loss {val_loss:.5f}" if val_loss is not None else "") +
                 f"  lr {lr:.3g}  {seconds:.1f}s" + ("  (best)" if improved else ""))
        for hook in hooks:
            hook(epoch + 1, row, model)
        if cfg.early_stopping and early["wait"] >= cfg.early_stopping:
            stopped_early = True
            if info["chief"]:
                _say(f"early stopping: no improvement of {monitor} for {cfg.early_stopping} epochs")
            break

    if not info["chief"]:
        return model_dir
    if not history:
        raise ConfigError(f"{model_dir}: no epoch was trained (epochs={cfg.epochs}); pass a larger --epochs")
    meta = _metadata(store, cfg, loss_spec, info, history, best, stopped_early, Path(patches), command)
    _export(model, spec, model_dir, cfg, loss_spec, best_file, meta)
    _say(f"exported {model_dir} (best {monitor} {best['value']:.5f} at epoch {best['epoch']})")
    return model_dir

