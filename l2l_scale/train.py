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
same global batch.

Input pipeline
--------------
:func:`patch_dataset` reads the zarr store chunk by chunk (each chunk holds a few hundred patches): the list of
chunks is shuffled every pass, each chunk's patches are permuted, ``interleave`` reads several chunks in parallel
and alternates their patches, windows of a few chunks' patches are permuted again, then batches are formed and
prefetched. Every shuffle is stateless, keyed by the seed (so a seed can be a tensor). The store is written
in a globally shuffled order (:mod:`l2l_scale.patches`), so every chunk already mixes many images. Only a few
chunks are in memory at a time. For several workers the chunk list is sharded by worker. Training reads all its
epochs through one iterator (epoch ``e`` seeded by ``seed + 1000 e``): a new iterator per epoch cost ~0.8 s per
epoch on 2 CPU cores, a third of a step's time at 25 steps per epoch. Each epoch's validation pass covers every
validation patch once on one device (whole batches per replica under a strategy), and the validation loss is
the mean over those patches, as Keras' ``fit`` computes it for CSBDeep.

Checkpoints and resuming
------------------------
After every epoch the chief writes ``MODEL_DIR/checkpoints/epoch-NNNN.weights.h5`` (a Keras weights file holding
the network *and* the optimiser state: Adam moments, iteration count, learning rate), ``best-NNNN.npz`` when the
monitored loss improved, and then ``state.json`` (epoch, history, best epoch, ReduceLROnPlateau and early-stopping
counters), which is the commit point. ``resume=True`` rebuilds the network, loads the last checkpoint and
continues with the next epoch. Every epoch draws its batches from a stream seeded by (seed, epoch), so a resumed
run sees the batches an uninterrupted run would have, and on one device its weights come out bit-identical
(``tests/test_train.py``). For multi-worker
training ``MODEL_DIR`` must be on a file system that every worker can read.

Progress: one log line per epoch, ``MODEL_DIR/logs/history.csv``, and TensorBoard scalars in
``MODEL_DIR/logs/tensorboard`` when the ``tensorboard`` package is installed.

A NaN or infinite loss stops training at once; the last good checkpoint stays in place and a
:class:`TrainingDivergedError` says what to try.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from l2l_scale.config import TrainConfig, train_config
from l2l_scale.errors import ConfigError, InputError, OutputError
from l2l_scale.io.atomic import say as _say, write_json

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

    from l2l_scale.patches import PatchStore

__all__ = ["TrainingDivergedError", "patch_dataset", "select_strategy", "train"]

CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
STATE_FILE = "state.json"
HISTORY_FILE = "history.csv"
# Keys that fix what the weights mean: a resumed run must keep them.
_FIXED_KEYS = ("unet_n_depth", "unet_kern_size", "unet_n_first", "unet_residual", "unet_last_activation", "loss",
               "ssim_weights", "ssim_filter_size", "ssim_filter_sigma", "ssim_max_val")


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


# ---------------------------------------------------------------------------------------------- input pipeline


def _chunk_ranges(start: int, stop: int, chunk: int) -> np.ndarray:
    """``[(a, b), ...]`` row ranges of the store chunks that intersect ``[start, stop)``, clipped to it."""
    if stop <= start:
        return np.zeros((0, 2), np.int64)
    first = (start // chunk) * chunk
    edges = list(range(first, stop, chunk))
    return np.array([(max(a, start), min(a + chunk, stop)) for a in edges], dtype=np.int64)


class _ChunkReader:
    """Reads row ranges of X and Y; opened lazily once per process (tf.data calls it from its threads)."""

    def __init__(self, path: str):
        self.path = path
        self._arrays = None

    def __call__(self, rows: np.ndarray):
        if self._arrays is None:
            import zarr

            root = zarr.open_group(self.path, mode="r")
            self._arrays = (root["X"], root["Y"])
        a, b = int(rows[0]), int(rows[1])
        X, Y = self._arrays
        return np.asarray(X[a:b], np.float32), np.asarray(Y[a:b], np.float32)


def patch_dataset(store: "PatchStore | str | Path", split: str = "train", *, batch_size: int = 16,
                  shuffle: bool = True, repeat: bool = True, seed: int = 0, num_shards: int = 1, shard_index: int = 0,
                  shuffle_buffer: int | None = None, cycle_length: int | None = None,
                  deterministic: bool = True, drop_remainder: bool = True) -> "tf.data.Dataset":
    """A ``tf.data`` pipeline over one split of a patch store, read chunk by chunk.

    Parameters
    ----------
    store : PatchStore or path
    split : {"train", "validation"}
        Training rows ``[0, n_train)`` or validation rows ``[n_train, N)``.
    batch_size : int
        Batch size of the yielded batches (``drop_remainder=True``).
    shuffle : bool
        Shuffle the chunk order every pass and mix patches in a shuffle buffer.
    repeat : bool
        Repeat forever (training uses a fixed number of steps per epoch).
    seed : int
        Seed of both shuffles.
    num_shards, shard_index : int
        This worker's share: the chunk list is sharded (or, with fewer chunks than shards, the patches).
    shuffle_buffer : int, optional
        Patches in the shuffle buffer (default: two chunks).
    cycle_length : int, optional
        Chunks read concurrently (default: 4).
    deterministic : bool
        Keep the element order independent of thread timing (reproducible runs).
    drop_remainder : bool
        Drop a last batch smaller than ``batch_size`` (``False`` to see every patch of a single pass).

    Returns
    -------
    tf.data.Dataset
        Elements ``(x, y)`` of shapes ``[batch, P, P, C_in]`` and ``[batch, P, P, C_out]``, float32.

    Raises
    ------
    InputError
        The split holds no patches.
    """
    ds = _pipeline(_open_split(store, split), split, batch_size=batch_size, shuffle=shuffle, repeat=repeat,
                   seed=seed, num_shards=num_shards, shard_index=shard_index, shuffle_buffer=shuffle_buffer,
                   cycle_length=cycle_length, deterministic=deterministic, drop_remainder=drop_remainder)
    return _finish(ds, deterministic)


def _open_split(store, split: str):
    from l2l_scale.patches import PatchStore, open_patches

    if not isinstance(store, PatchStore):
        store = open_patches(store)
    if split not in ("train", "validation"):
        raise ConfigError(f"split {split!r} is not 'train' or 'validation'")
    start, stop = (0, store.n_train) if split == "train" else (store.n_train, store.n_patches)
    if stop <= start:
        raise InputError(f"patch store {store.path} holds no {split} patches; recreate it with 'l2l-scale patches'")
    return store


def _pipeline(store, split: str, *, batch_size: int, shuffle: bool, repeat: bool, seed: Any, num_shards: int,
              shard_index: int, shuffle_buffer: int | None, cycle_length: int | None, deterministic: bool,
              drop_remainder: bool) -> "tf.data.Dataset":
    """:func:`patch_dataset` without prefetch and options.

    Every random choice is a stateless shuffle keyed by ``seed`` (an int, or a tensor inside ``flat_map``: tf.data's
    own ``shuffle`` only takes Python seeds): the chunk order of each pass by ``(seed, pass)``, the patches of
    each chunk read by ``(seed + 1, pass, first row)``, and each window of ``shuffle_buffer`` patches (default two
    chunks) by ``(seed + 2, window)``.
    """
    import tensorflow as tf

    start, stop = (0, store.n_train) if split == "train" else (store.n_train, store.n_patches)
    ranges = _chunk_ranges(start, stop, store.chunk)
    p = store.patch_size
    cin, cout = store.X.shape[-1], store.Y.shape[-1]
    reader = _ChunkReader(str(store.path))
    by_chunk = num_shards > 1 and len(ranges) >= num_shards
    if by_chunk:
        ranges = ranges[shard_index::num_shards]
    chunk_rows = tf.constant(ranges, tf.int64)
    seed = tf.cast(seed, tf.int64)
    shuffle_of = tf.random.experimental.stateless_shuffle

    def one_pass(k):
        order = shuffle_of(chunk_rows, seed=tf.stack([seed, k])) if shuffle else chunk_rows
        return tf.data.Dataset.from_tensor_slices((tf.fill([tf.shape(order)[0]], k), order))

    # Shuffled passes may overlap in the interleave; unshuffled ones repeat whole (below), so every pass of the
    # validation rows is the same sequence.
    passes = tf.data.Dataset.counter() if repeat and shuffle else tf.data.Dataset.range(1)
    ds = passes.flat_map(one_pass)

    def load(k, rows):
        x, y = tf.numpy_function(reader, [rows], (tf.float32, tf.float32), stateful=False)
        x.set_shape([None, p, p, cin])
        y.set_shape([None, p, p, cout])
        if shuffle:
            perm = shuffle_of(tf.range(tf.shape(x)[0]), seed=tf.stack([seed + 1, k * (1 << 32) + rows[0]]))
            x, y = tf.gather(x, perm), tf.gather(y, perm)
        return tf.data.Dataset.from_tensor_slices((x, y))

    cycle = int(cycle_length or min(4, len(ranges)))
    ds = ds.interleave(load, cycle_length=max(1, cycle), block_length=1, num_parallel_calls=max(1, cycle),
                       deterministic=deterministic)
    if repeat and not shuffle:
        ds = ds.repeat()
    if num_shards > 1 and not by_chunk:
        ds = ds.shard(num_shards, shard_index)
    if shuffle:
        def mix(i, xy):
            perm = shuffle_of(tf.range(tf.shape(xy[0])[0]), seed=tf.stack([seed + 2, i]))
            return tf.data.Dataset.from_tensor_slices((tf.gather(xy[0], perm), tf.gather(xy[1], perm)))

        ds = ds.batch(int(shuffle_buffer or 2 * store.chunk)).enumerate().flat_map(mix)
    return ds.batch(batch_size, drop_remainder=drop_remainder)


def _finish(ds, deterministic: bool) -> "tf.data.Dataset":
    import tensorflow as tf

    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    # We shard ourselves (by chunk); tf.distribute's auto-sharding would shard the chunk list a second time.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


def _epoch_stream(store, split: str, *, batch_size: int, first_epoch: int, epochs: int, steps: int | None,
                  seed: int, num_shards: int = 1, shard_index: int = 0, shuffle_buffer: int | None = None,
                  drop_remainder: bool = True) -> "tf.data.Dataset":
    """The batches of epochs ``[first_epoch, epochs)`` as one pipeline, iterated once for the whole run.

    Training: epoch ``e`` is ``steps`` batches of a shuffled, repeated pass seeded by ``seed + 1000 * e``, so a run
    resumed at ``first_epoch`` sees the batches an uninterrupted run would have. Validation: epoch ``e`` is one
    unshuffled pass (``steps`` batches at most), the same patches every epoch. Building and tearing down a
    ``tf.data`` iterator per epoch, as before, cost about 0.8 s per epoch on a 2-core CPU (a third of the step
    time at 25 steps per epoch); one iterator for the whole run removes it.
    """
    import tensorflow as tf

    train = split == "train"

    def one(epoch):
        # Whole batches of a short validation split need its patches repeated (the first batches, every epoch).
        ds = _pipeline(store, split, batch_size=batch_size, shuffle=train, repeat=train or drop_remainder,
                       seed=seed + 1000 * epoch, num_shards=num_shards,
                       shard_index=shard_index, shuffle_buffer=shuffle_buffer, cycle_length=None,
                       deterministic=True, drop_remainder=drop_remainder)
        return ds.take(steps) if steps else ds

    return _finish(tf.data.Dataset.range(first_epoch, epochs).flat_map(one), True)


def _distributed(strategy, info: dict, store, split: str, global_batch: int, **kw):
    """Per-replica batches of :func:`_epoch_stream` distributed by ``strategy``, sharded by input pipeline.

    One device sees every validation patch (a last, smaller batch included: the validation loss is the mean over
    all of them, as Keras' ``fit`` computes CSBDeep's); replicas get whole batches only.
    """
    if _one_device(strategy, info):
        return _epoch_stream(store, split, batch_size=global_batch, drop_remainder=split == "train", **kw)

    def fn(ctx):
        # One pipeline feeds all replicas of its worker, a batch each per step.
        per_step = max(1, ctx.num_replicas_in_sync // ctx.num_input_pipelines)
        opts = dict(kw, steps=kw["steps"] * per_step) if kw.get("steps") else kw
        return _epoch_stream(store, split, batch_size=ctx.get_per_replica_batch_size(global_batch),
                             num_shards=ctx.num_input_pipelines, shard_index=ctx.input_pipeline_id, **opts)

    return strategy.distribute_datasets_from_function(fn)


# ----------------------------------------------------------------------------------------------- the loop


def _one_device(strategy, info: dict) -> bool:
    """No distribution: batches go to the model as they are (no per-replica split)."""
    import tensorflow as tf

    return info["replicas"] == 1 and info["workers"] == 1 and not isinstance(strategy, tf.distribute.MirroredStrategy)


def _make_steps(model, optimizer, loss_fn, strategy, global_batch: int):
    """Graph-compiled training and validation steps: the global-batch mean loss, and (loss sum, patch count)."""
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

    @tf.function
    def train_step(iterator):
        x, y = next(iterator)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_train, args=(x, y)), axis=None)

    @tf.function
    def eval_step(iterator):
        x, y = next(iterator)
        total, count = strategy.run(replica_eval, args=(x, y))
        return (strategy.reduce(tf.distribute.ReduceOp.SUM, total, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, count, axis=None))

    return train_step, eval_step


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


def _prepare_dir(model_dir: Path, resume: bool, overwrite: bool, chief: bool, cfg_d: dict,
                 patches: Path) -> dict | None:
    """Check the model folder against resume/overwrite and return the saved state to resume from (or None)."""
    from l2l_scale.model.unet import CONFIG_FILE

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
        from l2l_scale.model.unet import METADATA_FILE, WEIGHTS_BEST, WEIGHTS_LAST

        for name in (CHECKPOINT_DIR, LOG_DIR):
            shutil.rmtree(model_dir / name, ignore_errors=True)
        for name in (CONFIG_FILE, WEIGHTS_BEST, WEIGHTS_LAST, METADATA_FILE):
            (model_dir / name).unlink(missing_ok=True)
    parent = model_dir.resolve().parent
    if not parent.exists():
        raise OutputError(f"{parent}: output folder does not exist; create it first")
    return None


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
          hooks: Sequence[Callable[[int, dict, Any], None]] = (), **values: Any) -> Path:
    """Train a CARE U-Net on a patch store and export a CSBDeep model folder.

    Parameters
    ----------
    patches : path
        Patch store from :func:`l2l_scale.patches.create_patches`.
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

    from l2l_scale.model import build_unet, export_model
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
    train_step, eval_step = _make_steps(model, optimizer, loss_fn, strategy, cfg.batch_size)
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
        total = 0.0
        for step in range(cfg.steps_per_epoch):
            value = float(train_step(train_it))
            if not math.isfinite(value):
                kept = (f"the last good checkpoint (epoch {history[-1]['epoch']}) is kept in {ckpt_dir}" if history
                        else "no checkpoint was written yet")
                raise TrainingDivergedError(
                    f"training diverged: the loss is {value} at epoch {epoch + 1}, step {step + 1}; {kept}; lower "
                    f"the learning rate (e.g. --learning-rate {cfg.learning_rate / 10:g}) and rerun"
                    + (" with --resume" if history else "") + ", or check the patches for NaN values")
            total += value
        loss = total / cfg.steps_per_epoch
        val_loss = None
        if val_steps:
            # Each epoch of the validation stream is the same pass over the same validation patches.
            sums = [eval_step(val_it) for _ in range(val_steps)]
            val_loss = sum(float(a) for a, _ in sums) / max(sum(float(n) for _, n in sums), 1.0)
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
            ckpt = f"epoch-{epoch + 1:04d}.weights.h5"
            tmp = ckpt_dir / f".tmp-{ckpt}"
            model.save_weights(str(tmp))
            os.replace(tmp, ckpt_dir / ckpt)
            if improved:
                new_best = f"best-{epoch + 1:04d}.npz"
                np.savez(ckpt_dir / f".tmp-{new_best}", *model.get_weights())
                os.replace(ckpt_dir / f".tmp-{new_best}", ckpt_dir / new_best)
                best_file = new_best
            write_json(ckpt_dir / STATE_FILE, {
                "epoch": epoch + 1, "checkpoint": ckpt, "best_weights": best_file, "history": history,
                "best": best, "plateau": plateau, "early": early, "monitor": monitor, "config": cfg_d,
                "patches": str(Path(patches).resolve()), "strategy": info["name"], "replicas": info["replicas"]})
            # Older checkpoints go only after the new state is committed.
            for old in ckpt_dir.iterdir():
                if old.name.startswith(("epoch-", "best-")) and old.name not in (ckpt, best_file):
                    old.unlink(missing_ok=True)
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
    best_weights = None
    if best_file and (ckpt_dir / best_file).is_file():
        with np.load(ckpt_dir / best_file) as npz:
            best_weights = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    meta = _metadata(store, cfg, loss_spec, info, history, best, stopped_early, Path(patches))
    train_params = {"train_epochs": cfg.epochs, "train_steps_per_epoch": cfg.steps_per_epoch,
                    "train_learning_rate": cfg.learning_rate, "train_batch_size": cfg.batch_size,
                    "train_tensorboard": bool(cfg.tensorboard),
                    "train_reduce_lr": {"factor": cfg.reduce_lr_factor, "patience": cfg.reduce_lr_patience,
                                        "min_delta": cfg.reduce_lr_min_delta} if cfg.reduce_lr else None,
                    **({"train_loss": {"l1": "mae", "l2": "mse"}[loss_spec.name]}
                       if loss_spec.name in ("l1", "l2") else {})}
    export_model(model, spec, model_dir, metadata=meta, weights_best=best_weights, train_params=train_params,
                 overwrite=True)
    _say(f"exported {model_dir} (best {monitor} {best['value']:.5f} at epoch {best['epoch']})")
    return model_dir


def _metadata(store, cfg: TrainConfig, loss_spec, info: dict, history: list, best: dict, stopped_early: bool,
              patches: Path) -> dict:
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
            cfg.model_dump(mode="json"), str(patches.resolve()),
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
