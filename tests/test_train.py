"""Training: configs, the tf.data input pipeline, strategies (mirrored, multi-worker), checkpoints and resume,
NaN handling, CSBDeep export, user errors, and (slow) that Label2label removes background that Noise2Noise keeps.

Networks are tiny (depth 1-2, 8-16 filters) and trained for a few steps. Anything that configures TensorFlow
devices or multi-worker collectives runs in a subprocess, because TF can be configured only before it starts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr
import zarr
from scipy import ndimage

from l2l_scale.cli import main
from l2l_scale.config import PRESETS, TrainConfig, train_config
from l2l_scale.errors import ConfigError, OutputError
from l2l_scale.io.read import open_image
from l2l_scale.io.write import write_image, write_plate
from l2l_scale.patches import ATTRS_KEY, create_patches, open_patches

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--unet-depth", "1", "--unet-n-first", "8", "--unet-kern-size", "3"]


def _env() -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    env.pop("TF_CONFIG", None)
    return env


def _field(seed: int, size: int = 160) -> np.ndarray:
    """Blobs (target) and blobs plus a smooth background (input), uint16."""
    rng = np.random.default_rng(seed)
    tg = np.zeros((size, size))
    tg[tuple(rng.integers(8, size - 8, (2, 40)))] = 1.0
    tg = ndimage.gaussian_filter(tg, 1.5)
    tg = 2000 * tg / tg.max()
    yy, xx = np.mgrid[:size, :size]
    inp = 0.6 * tg + 400 * (1 + np.sin(yy / 9.0) * np.cos(xx / 11.0))
    return np.stack([inp + rng.poisson(30, tg.shape), tg + rng.poisson(10, tg.shape)]).astype(np.uint16)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    plate = base / "plate.zarr"
    fields = {f"A/1/{i}": xr.DataArray(_field(i), dims=("c", "y", "x"), coords={"c": ["in", "tg"]},
                                       attrs={"pixel_size": 0.05}) for i in range(4)}
    write_plate(fields, plate, chunks=64)
    store = create_patches(plate, base / "patches.zarr", input_channels=["in"], target_channels=["tg"],
                           patch_size=32, patches_per_image=24, percentiles=(1, 99.9), split_by="patch",
                           validation_fraction=0.25, chunk_patches=16)
    return {"base": base, "plate": plate, "store": store}


# ------------------------------------------------------------------------------------------------ configs


def test_config_precedence(tmp_path):
    cfg = train_config(preset="actin")
    a = PRESETS["actin"]
    assert (cfg.learning_rate, cfg.batch_size, cfg.steps_per_epoch, cfg.epochs) == (2e-4, 32, 100, 400)
    assert a.zooms == (0.5, 0.75, 1.25, 1.5) and PRESETS["caveolae"].zooms == (0.8, 0.9, 1.1, 1.2)
    assert train_config(preset="caveolae").batch_size == 16 and PRESETS["caveolae"].poisson
    assert train_config(preset="separation").steps_per_epoch == 1000
    f = tmp_path / "train.yaml"
    f.write_text("preset: tubulin\nepochs: 7\nloss: ms-ssim3\n")
    cfg = train_config(f, learning_rate=1e-3)
    assert (cfg.preset, cfg.epochs, cfg.learning_rate, cfg.batch_size, cfg.loss) == ("tubulin", 7, 1e-3, 32, "ms-ssim3")
    assert TrainConfig().loss == "l1" and TrainConfig().unet_kern_size == 5  # CSBDeep defaults


@pytest.mark.parametrize("text,match", [
    ("lerning_rate: 0.001\n", "unknown key 'lerning_rate'; valid keys are: .*learning_rate"),
    ("epochs: -3\n", "epochs: Input should be greater than or equal to 1"),
    ("loss: ms-ssim\n", "needs weights"),
    ("- 1\n- 2\n", "must be a mapping"),
    ("epochs: [1\n", "invalid YAML"),
    ("preset: muscle\n", "unknown preset"),
])
def test_config_errors(tmp_path, text, match):
    f = tmp_path / "train.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        train_config(f)


# -------------------------------------------------------------------------------------------- input pipeline


def test_dataset_reads_chunks_and_shards(data):
    import tensorflow as tf

    from l2l_scale.train_input import _chunk_ranges, patch_dataset

    store = open_patches(data["store"])
    assert _chunk_ranges(10, 40, 16).tolist() == [[10, 16], [16, 32], [32, 40]]
    n_train = store.n_train
    X = store.X[...]
    ds = patch_dataset(store, "train", batch_size=1, shuffle=False, repeat=False)
    got = np.concatenate([x.numpy() for x, _ in ds])
    assert got.shape[0] == n_train
    # every training patch exactly once (interleaving reorders them)
    assert sorted(map(float, got.sum(axis=(1, 2, 3)))) == pytest.approx(sorted(map(float, X[:n_train].sum(axis=(1, 2, 3)))))
    # shuffled, repeated, batched; deterministic for a seed
    a = [x.numpy() for x, _ in patch_dataset(store, batch_size=8, seed=3).take(5)]
    b = [x.numpy() for x, _ in patch_dataset(store, batch_size=8, seed=3).take(5)]
    assert all(np.array_equal(u, v) for u, v in zip(a, b)) and a[0].shape == (8, 32, 32, 1)
    # two shards split the chunks: disjoint and complete
    parts = [np.concatenate([x.numpy() for x, _ in patch_dataset(store, batch_size=1, shuffle=False, repeat=False,
                                                                   num_shards=2, shard_index=i)]) for i in (0, 1)]
    assert parts[0].shape[0] + parts[1].shape[0] == n_train
    val = np.concatenate([y.numpy() for _, y in patch_dataset(store, "validation", batch_size=1, shuffle=False,
                                                              repeat=False)])
    assert val.shape[0] == store.n_validation
    assert isinstance(ds, tf.data.Dataset)


def test_chunk_reader_cache_is_bounded_and_exact(data):
    from l2l_scale.train_input import _ChunkReader

    store = open_patches(data["store"])
    X, Y = store.X[...], store.Y[...]
    row_bytes = (X[:1].astype(np.float32).nbytes + Y[:1].astype(np.float32).nbytes)
    reader = _ChunkReader(str(data["store"]), cache_bytes=20 * row_bytes)  # one 16-row chunk fits, two do not
    for a, b in [(0, 16), (16, 32), (0, 16), (32, 40), (0, 16)]:
        x, y = reader(np.array([a, b]))
        np.testing.assert_array_equal(x, X[a:b])
        np.testing.assert_array_equal(y, Y[a:b])
        assert not x.flags.writeable and reader._held <= reader.cache_bytes
    assert list(reader._cache) == [(0, 16)]
    assert reader(np.array([0, 16]))[0] is x  # served from the cache
    big = _ChunkReader(str(data["store"]), cache_bytes=row_bytes)  # a range larger than the cache is not kept
    assert big(np.array([0, 16]))[0].flags.writeable and not big._cache


# -------------------------------------------------------------------- train, export, CSBDeep, predict


@pytest.fixture(scope="module")
def trained(data):
    from l2l_scale.train import train

    out = data["base"] / "model"
    train(data["store"], out, epochs=2, steps_per_epoch=3, batch_size=4, unet_n_depth=2, unet_n_first=8,
          unet_kern_size=3, learning_rate=1e-3, strategy="none", loss="ms-ssim3", ssim_filter_size=5)
    return out


def test_export_metadata_and_history(trained, data):
    from l2l_scale.model import read_metadata

    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "weights_best.h5", "weights_last.h5", "l2l_scale.json", "checkpoints", "logs"} <= names
    meta = read_metadata(trained)
    assert meta["channels"] == {"input": ["in"], "output": ["tg"]}
    assert meta["normalization"]["percentiles"] == [1.0, 99.9]
    assert meta["loss"]["name"] == "ms-ssim3" and meta["loss"]["filter_size"] == 5
    assert meta["provenance"]["patches"]["path"] == str(Path(data["store"]).resolve())
    assert meta["provenance"]["training"]["global_batch"] == 4
    rows = (trained / "logs" / "history.csv").read_text().strip().splitlines()
    assert rows[0].startswith("epoch,loss,val_loss") and len(rows) == 3
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["unet_n_depth"] == 2 and cfg["train_learning_rate"] == 1e-3


def test_csbdeep_loads_and_predicts_identically(trained, data, tmp_path):
    from csbdeep.models import CARE

    from l2l_scale.model import load_model
    from l2l_scale.predict import predict

    raw = _field(11, size=100)  # odd-sized: CSBDeep and predict pad to the U-Net grid
    img = xr.DataArray(raw, dims=("c", "y", "x"), coords={"c": ["in", "tg"]}, attrs={"pixel_size": 0.05})
    write_image(img, tmp_path / "img.zarr", chunks=64)
    lo, hi = np.percentile(raw[0], [1, 99.9])
    x = ((raw[0].astype(np.float32) - np.float32(lo)) / (np.float32(hi) - np.float32(lo) + np.float32(1e-20)))
    care = CARE(None, trained.name, basedir=str(trained.parent))
    ref = care.predict(x, "YX", normalizer=None)
    ours = load_model(trained).predict_batch(x[None, :96, :96, None])[0, ..., 0]
    np.testing.assert_allclose(care.predict(x[:96, :96], "YX", normalizer=None), ours, atol=1e-5)
    out = predict(trained, tmp_path / "img.zarr", tmp_path / "restored.zarr")
    restored = np.asarray(open_image(out).sel(c="in-restored").values)
    np.testing.assert_allclose(restored, ref, atol=1e-5)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data):
    from l2l_scale.train import TrainingDivergedError, train

    out = data["base"] / "nan"

    def poison(epoch, logs, model):
        if epoch == 1:
            model.set_weights([np.full_like(w, np.nan) for w in model.get_weights()])

    with pytest.raises(TrainingDivergedError, match=r"loss is nan at epoch 2, step 1;.*last good checkpoint \(epoch 1\)"
                                                   r".*lower the learning rate"):
        train(data["store"], out, epochs=3, steps_per_epoch=2, batch_size=4, unet_n_depth=1, unet_n_first=8,
              strategy="none", hooks=[poison])
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 1 and (out / "checkpoints" / state["checkpoint"]).is_file()
    assert not (out / "config.json").exists()
    with h5py.File(out / "checkpoints" / state["checkpoint"]) as f:
        assert all(np.isfinite(f[k][...]).all() for k in _h5_datasets(f))


def test_validation_loss_is_the_mean_over_every_validation_patch(data):
    """24 validation patches at batch 16: the last, smaller batch counts, each patch once (Keras fit's mean)."""
    from l2l_scale.train import train

    store = open_patches(data["store"])
    xv, yv = store.X[store.n_train:], store.Y[store.n_train:]
    want = []

    def score(epoch, logs, model):
        pred = np.asarray(model(xv, training=False))
        want.append((logs["val_loss"], float(np.mean(np.abs(pred - yv)))))

    train(data["store"], data["base"] / "val_mean", epochs=2, steps_per_epoch=2, batch_size=16, unet_n_depth=1,
          unet_n_first=8, strategy="none", tensorboard=False, hooks=[score])
    assert store.n_validation % 16 and len(want) == 2
    for got, ref in want:
        assert got == pytest.approx(ref, rel=1e-5)


def test_plateau_and_early_stopping(data):
    """After a worse epoch the learning rate halves (patience 1); after two, training stops (patience 2)."""
    from l2l_scale.model import load_model, read_metadata
    from l2l_scale.train import train

    out = data["base"] / "early"
    rng = np.random.default_rng(0)
    first: list = []

    def spoil(epoch, logs, model):  # make every later epoch worse than the first
        if epoch == 1:
            first.extend(model.get_weights())
        model.set_weights([w + rng.normal(0, 0.5, w.shape).astype(w.dtype) for w in model.get_weights()])

    train(data["store"], out, epochs=6, steps_per_epoch=2, batch_size=4, unet_n_depth=1, unet_n_first=8,
          learning_rate=1e-6, reduce_lr_patience=1, early_stopping=2, strategy="none", hooks=[spoil])
    rows = (out / "logs" / "history.csv").read_text().strip().splitlines()[1:]
    lrs = [float(r.split(",")[3]) for r in rows]
    assert len(rows) == 3 and lrs == pytest.approx([1e-6, 1e-6, 5e-7])
    meta = read_metadata(out)["provenance"]["training"]
    assert meta["stopped_early"] and meta["best_epoch"] == 1
    best = load_model(out, "weights_best.h5").keras_model.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(best, first))


def _h5_datasets(f) -> list[str]:
    names: list[str] = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


# ------------------------------------------------------------------------------------------------- errors


def test_user_errors_exit_2(data, tmp_path, capsys, monkeypatch):
    store = str(data["store"])
    empty = tmp_path / "empty.zarr"
    root = zarr.open_group(str(empty), mode="w", zarr_format=3)
    for name in ("X", "Y"):
        root.create_array(name, shape=(0, 32, 32, 1), chunks=(16, 32, 32, 1), dtype="float32")
    root.attrs[ATTRS_KEY] = {"format": 1, "n_train": 0, "n_validation": 0, "channels": {"input": ["a"],
                                                                                       "output": ["b"]}}
    yaml = tmp_path / "train.yaml"
    yaml.write_text("epochs: 2\nlerning_rate: 0.1\n")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    cases = [
        ([str(empty), str(tmp_path / "m1")], "is empty (no training patches)"),
        ([store, str(tmp_path / "m2"), "--strategy", "multiworker"], "needs the TF_CONFIG environment variable"),
        ([store, str(tmp_path / "m3"), "--loss", "ms-ssim5", "--ssim-filter-size", "11"],
         "needs patches of at least 161 px but the patches are 32 px"),
        ([store, str(tmp_path / "m4"), "--config", str(yaml)], "unknown key 'lerning_rate'"),
        ([store, str(tmp_path / "m5"), "--unet-depth", "6"], "not a multiple of the U-Net grid 64"),
        ([str(tmp_path / "missing.zarr"), str(tmp_path / "m6")], "does not exist"),
        ([store, str(tmp_path / "m7"), "--resume"], "no checkpoint to resume from"),
    ]
    for argv, match in cases:
        assert main(["train", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("l2l-scale train: error: ") and match in err, (argv, err)
    from l2l_scale.train import _check_batch

    with pytest.raises(ConfigError, match="smaller than the 2 replicas"):
        _check_batch(1, 2)
    with pytest.raises(ConfigError, match="use --batch-size 4 or 6"):
        _check_batch(5, 2)
    assert _check_batch(8, 2) == 4


def test_missing_or_broken_tensorboard_never_breaks_training(tmp_path, monkeypatch):
    import types

    from l2l_scale.train_folder import _TensorBoard

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # not installed
    board = _TensorBoard(tmp_path / "tb", True)
    assert board.writer is None
    board.write(1, {"loss": 0.5})
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))  # installed but broken
    board = _TensorBoard(tmp_path / "tb2", True)
    board.write(1, {"loss": 0.5, "val_loss": None})  # must not raise


def test_refuses_existing_model(trained, data):
    from l2l_scale.train import train

    with pytest.raises(OutputError, match="already holds a trained model"):
        train(data["store"], trained, epochs=1, steps_per_epoch=1, batch_size=4, strategy="none")


# ------------------------------------------------------------------------------- strategies (subprocesses)


_DEVICES = """
import sys
import tensorflow as tf
n = int(sys.argv[1])
if n > 1:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
from l2l_scale.cli import main
codes, argv = [], []
for arg in sys.argv[2:] + ["::"]:  # several l2l-scale commands in one process, separated by '::'
    if arg == "::":
        codes.append(main(argv))
        argv = []
    else:
        argv.append(arg)
print("exit codes", codes, file=sys.stderr)
sys.exit(max(codes))
"""


def _history(model_dir: Path) -> list[dict]:
    import csv

    with open(model_dir / "logs" / "history.csv") as f:
        return list(csv.DictReader(f))


def test_mirrored_two_devices_follows_one_device(data):
    """MirroredStrategy over two logical CPUs gives the loss curve of one device at the same global batch."""
    base = data["base"]
    common = ["--epochs", "3", "--steps-per-epoch", "4", "--batch-size", "8", "--learning-rate", "0.001", "--seed",
              "1", *TINY]
    store = str(data["store"])
    bad = ["train", store, str(base / "mirror_bad"), "--batch-size", "1", "--strategy", "mirrored", "::"]
    procs = {n: subprocess.Popen([sys.executable, "-c", _DEVICES, str(n), *(bad if n > 1 else []), "train", store,
                                  str(base / f"mirror{n}"), *common, "--strategy", "mirrored" if n > 1 else "none"],
                                 env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in (1, 2)}
    outs = {n: p.communicate(timeout=300) for n, p in procs.items()}
    assert procs[1].returncode == 0, outs[1][1][-3000:]
    assert "exit codes [2, 0]" in outs[2][1], outs[2][1][-3000:]
    assert "batch size 1 is smaller than the 2 replicas; use --batch-size 2 or more" in outs[2][1]
    assert "MirroredStrategy: per-replica batch 4 x 2 replica(s) = global batch 8" in outs[2][1]
    assert "no strategy (one device): per-replica batch 8 x 1 replica(s) = global batch 8" in outs[1][1]
    one, two = _history(base / "mirror1"), _history(base / "mirror2")
    for key in ("loss", "val_loss"):
        a = np.array([float(r[key]) for r in one])
        b = np.array([float(r[key]) for r in two])
        np.testing.assert_allclose(a, b, rtol=1e-3)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_multiworker_two_processes(data):
    out = data["base"] / "multiworker"
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(2):
        env = dict(_env(), TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "l2l_scale.cli", "train", str(data["store"]), str(out), "--strategy", "multiworker",
             "--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "4", *TINY],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    chief_err = outs[0][1]
    assert "MultiWorkerMirroredStrategy: per-replica batch 2 x 2 replica(s) = global batch 4" in chief_err
    assert "epoch 2/2" in chief_err and "epoch 1/2" not in outs[1][1]  # only the chief logs and writes
    assert (out / "config.json").is_file() and len(_history(out)) == 2
    meta = json.loads((out / "l2l_scale.json").read_text())
    assert meta["provenance"]["training"]["workers"] == 2


def test_resume_after_kill_continues_from_the_last_epoch(data):
    out = data["base"] / "killed"
    argv = ["train", str(data["store"]), str(out), "--epochs", "40", "--steps-per-epoch", "4", "--batch-size", "4",
            "--strategy", "none", *TINY]
    proc = subprocess.Popen([sys.executable, "-m", "l2l_scale.cli", *argv], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    state_file = out / "checkpoints" / "state.json"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if state_file.exists() and json.loads(state_file.read_text())["epoch"] >= 1:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "training ended before it could be killed: " + proc.stderr.read()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = json.loads(state_file.read_text())["epoch"]
    assert 1 <= done < 40 and not (out / "config.json").exists()
    with pytest.raises(OutputError, match="interrupted training run"):
        from l2l_scale.train import train

        train(data["store"], out, epochs=40, steps_per_epoch=4, batch_size=4, strategy="none", unet_n_depth=1,
              unet_n_first=8, unet_kern_size=3)
    result = subprocess.run([sys.executable, "-m", "l2l_scale.cli", *argv, "--resume"], env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming {out} after epoch {done}" in result.stderr
    assert f"epoch {done + 1}/40" in result.stderr and f"epoch {done}/40 " not in result.stderr
    history = _history(out)
    assert [int(r["epoch"]) for r in history] == list(range(1, 41))
    state = json.loads(state_file.read_text())
    with h5py.File(out / "checkpoints" / state["checkpoint"]) as f:
        iterations = int(np.asarray(f["optimizer/vars/0"]))
    assert iterations == 40 * 4  # the optimiser state (step count, Adam moments) was restored, not restarted
    assert (out / "config.json").is_file()


# ----------------------------------------------------------------------------------- the method works (slow)


def _cytosol_mask(structure: str, seed: int, size: int) -> np.ndarray:
    """Inside-cell mask of a simulated field, from the simulator's own cell geometry."""
    from l2l_scale.synthetic import render as syn

    spec = syn.STRUCTURES[structure]
    tiles = syn._tiles_for(spec, seed, 0, size, 0, size)
    ys = np.arange(size, dtype=np.float64)
    cyto, _ = syn._fields(tiles, ys, ys, 1.0)
    return cyto > 0.5


def _fit_psnr(img: np.ndarray, truth_n: np.ndarray) -> float:
    """PSNR (data range 1) after the least-squares affine fit of ``img`` to the normalised truth."""
    A = np.stack([img.ravel(), np.ones(img.size)], axis=1)
    coef, *_ = np.linalg.lstsq(A, truth_n.ravel(), rcond=None)
    mse = np.mean((A @ coef - truth_n.ravel()) ** 2)
    return float(10 * np.log10(1.0 / mse))


@pytest.mark.slow
def test_label2label_beats_noise2noise_on_simulated_actin(tmp_path):
    """L2L restores the structure and removes the label's cytosolic background; N2N (same budget) keeps it.

    Data: simulated actin (AC-15 input, phalloidin target, AC-15-repeat second noise realisation, noise-free
    truth), 4 training fields and 2 held-out fields of 512^2. Both models: depth 2, 16 filters, 64^2 patches,
    L1, the same steps. Metrics on the held-out fields:

    * PSNR against the truth normalised to its 0.1/99.9 percentiles, after the least-squares affine fit of each
      image (raw input, restorations) to it, so that every image gets its best intensity scale;
    * Michelson contrast with the paper's recipe (:func:`label_contrast`);
    * mean cytosolic background: inside cells (simulator geometry) and off the structure (farther than 3 px from
      where the truth exceeds 2 % of its 99.9th percentile), of each image normalised to its own 1/99.9
      percentiles.
    """
    from l2l_scale.model import load_model
    from l2l_scale.preprocess.contrast import label_contrast
    from l2l_scale.synthetic import simulate
    from l2l_scale.train import train

    size, train_seeds, test_seeds = 512, [0, 1, 2, 3], [10, 11]
    plate = tmp_path / "actin.zarr"
    write_plate({f"A/1/{i}": simulate("actin", size, seed=s, n2n=True) for i, s in enumerate(train_seeds)},
                plate)
    kw = dict(patch_size=64, patches_per_image=128, augment=True, percentiles=(1, 99.9), split_by="patch",
              validation_fraction=0.05)
    l2l = create_patches(plate, tmp_path / "l2l.zarr", mode="l2l", input_channels=["AC-15"],
                         target_channels=["phalloidin"], **kw)
    n2n = create_patches(plate, tmp_path / "n2n.zarr", mode="n2n", input_channels=["AC-15"],
                         target_channels=["AC-15-repeat"], **kw)
    budget = dict(epochs=3, steps_per_epoch=25, batch_size=16, learning_rate=1e-3, unet_n_depth=2, unet_n_first=16,
                  unet_kern_size=3, strategy="none", seed=0)
    t0 = time.perf_counter()
    train(l2l, tmp_path / "m_l2l", **budget)
    t1 = time.perf_counter()
    train(n2n, tmp_path / "m_n2n", **budget)
    t2 = time.perf_counter()
    models = {"l2l": load_model(tmp_path / "m_l2l"), "n2n": load_model(tmp_path / "m_n2n")}
    numbers: dict[str, list] = {}
    for s in test_seeds:
        arr = simulate("actin", size, seed=s, n2n=True)
        raw = arr.sel(c="AC-15").values.astype(np.float32)
        truth = arr.sel(c="truth").values.astype(np.float64)
        lo, hi = np.percentile(raw, [1, 99.9])
        x = (raw - np.float32(lo)) / np.float32(hi - lo)
        images = {"raw": x.astype(np.float64)}
        for name, m in models.items():
            images[name] = m.predict_batch(x[None, ..., None])[0, ..., 0].astype(np.float64)
        tlo, thi = np.percentile(truth, [0.1, 99.9])
        truth_n = (truth - tlo) / (thi - tlo)
        structure = ndimage.binary_dilation(truth > 0.02 * thi, iterations=3)
        bg_mask = _cytosol_mask("actin", s, size) & ~structure
        for name, im in images.items():
            ilo, ihi = np.percentile(im, [1, 99.9])
            norm = (im - ilo) / (ihi - ilo)
            numbers.setdefault(f"{name}_psnr", []).append(_fit_psnr(im, truth_n))
            numbers.setdefault(f"{name}_michelson", []).append(label_contrast(im)[0])
            numbers.setdefault(f"{name}_background", []).append(float(norm[bg_mask].mean()))
    mean = {k: float(np.mean(v)) for k, v in numbers.items()}
    mean["train_seconds_l2l"], mean["train_seconds_n2n"] = round(t1 - t0, 1), round(t2 - t1, 1)
    print("method-works numbers:", json.dumps(mean, indent=1))
    assert mean["l2l_psnr"] > mean["raw_psnr"]
    assert mean["l2l_michelson"] > mean["raw_michelson"]
    assert mean["l2l_background"] < mean["n2n_background"]


def test_resume_is_bit_identical_to_an_uninterrupted_run(data):
    """Every epoch's batches are seeded by (seed, epoch) and the checkpoint holds the optimiser state, so
    stopping after epoch 1 and resuming gives the weights of a run that never stopped."""
    from l2l_scale.model import load_model
    from l2l_scale.train import train

    kw = dict(steps_per_epoch=3, batch_size=4, strategy="none", unet_n_depth=1, unet_n_first=8, unet_kern_size=3,
              learning_rate=1e-3)
    whole = train(data["store"], data["base"] / "uninterrupted", epochs=3, **kw)
    part = data["base"] / "resumed"
    train(data["store"], part, epochs=1, **kw)
    train(data["store"], part, epochs=3, resume=True, **kw)
    for name in ("weights_last.h5", "weights_best.h5"):
        want = load_model(whole, name).keras_model.get_weights()
        got = load_model(part, name).keras_model.get_weights()
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    # the resumed run trained epochs 2 and 3 itself
    assert json.loads((part / "checkpoints" / "state.json").read_text())["epoch"] == 3
