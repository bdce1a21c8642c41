"""Tests of l2l_scale.model: CSBDeep interoperability, receptive field, safe loading, cache.

Networks are tiny (depth 1-3, 8 filters) and CSBDeep trains them for 2 steps, so the weights are close to their
random initialisation: that is enough to compare two implementations of the same graph.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from l2l_scale.errors import ChannelError, ConfigError, ModelError, OutputError
from l2l_scale.model import (
    ModelSpec,
    build_unet,
    configure_tf_threads,
    export_model,
    get_cached_model,
    load_model,
    read_metadata,
    read_spec,
    weights_path,
)

# name -> (csbdeep Config arguments, train with CARE.train?)
CASES = {
    "d1k3_res": (dict(axes="YX", n_channel_in=1, n_channel_out=1, unet_n_depth=1, unet_kern_size=3), True),
    "d2k5_2in2out_relu": (
        dict(axes="YXC", n_channel_in=2, n_channel_out=2, unet_n_depth=2, unet_kern_size=5, unet_residual=False,
             unet_last_activation="relu"),
        True,
    ),
    "d3k3_2in1out": (dict(axes="YXC", n_channel_in=2, n_channel_out=1, unet_n_depth=3, unet_kern_size=3), True),
    # probabilistic: weights saved by CSBDeep's (patched) save_weights without training, to save time
    "d1k5_prob": (dict(axes="YX", n_channel_in=1, n_channel_out=1, unet_n_depth=1, unet_kern_size=5,
                       probabilistic=True), False),
}


def _patches(n: int, c_in: int, c_out: int, size: int = 32, seed: int = 0):
    """Structured pairs: blurred random spots as target, plus background and noise as input."""
    rng = np.random.default_rng(seed)
    base = rng.random((n, size, size), dtype=np.float32)
    base = (base + np.roll(base, 1, 1) + np.roll(base, 1, 2) + np.roll(base, (1, 1), (1, 2))) / 4
    y = np.stack([base**(2 + i) for i in range(c_out)], axis=-1).astype(np.float32)
    x = np.stack([base + 0.3 * rng.random((n, size, size)) + 0.1 * i for i in range(c_in)], axis=-1)
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def csbdeep_models(tmp_path_factory):
    """CSBDeep CARE model folders, written by csbdeep itself. Returns {case: folder}."""
    from csbdeep.models import CARE, Config

    basedir = tmp_path_factory.mktemp("csbdeep_models")
    folders = {}
    for name, (kwargs, train) in CASES.items():
        kw = dict(kwargs)
        axes, c_in, c_out = kw.pop("axes"), kw.pop("n_channel_in"), kw.pop("n_channel_out")
        config = Config(axes, c_in, c_out, unet_n_first=8, train_steps_per_epoch=2, train_epochs=1,
                        train_batch_size=4, train_tensorboard=False, **kw)
        care = CARE(config, name, str(basedir))
        if train:
            x, y = _patches(8, c_in, c_out)
            with warnings.catch_warnings():  # keras: "shuffle=True ... ignored" for csbdeep's generator
                warnings.simplefilter("ignore", UserWarning)
                care.train(x, y, validation_data=(x[:2], y[:2]))
        else:
            care.keras_model.save_weights(str(care.logdir / "weights_best.h5"))
        folders[name] = basedir / name
    return folders


def _csbdeep_predict(folder: Path, x: np.ndarray) -> np.ndarray:
    from csbdeep.models import CARE

    care = CARE(None, folder.name, str(folder.parent))
    return care.keras_model.predict(x, verbose=0)


def _input(spec: ModelSpec, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((2, 64, 48, spec.n_channel_in), dtype=np.float32)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------------------
# CSBDeep folders run here
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_csbdeep_model_loads_and_predicts_identically(csbdeep_models, case):
    folder = csbdeep_models[case]
    loaded = load_model(folder)
    kwargs = CASES[case][0]
    assert loaded.spec.unet_n_depth == kwargs["unet_n_depth"]
    assert loaded.spec.unet_kern_size == kwargs["unet_kern_size"]
    assert loaded.spec.n_channel_in == kwargs["n_channel_in"]
    assert loaded.spec.n_channel_out == kwargs["n_channel_out"]
    assert loaded.spec.probabilistic == kwargs.get("probabilistic", False)
    assert loaded.weights_file.name == "weights_best.h5"
    assert loaded.checksum == hashlib.sha256(loaded.weights_file.read_bytes()).hexdigest()
    assert loaded.metadata == {}

    x = _input(loaded.spec)
    y = loaded.predict_batch(x)
    ref = _csbdeep_predict(folder, x)
    n_out = loaded.spec.n_channel_out
    assert y.shape == x.shape[:3] + (n_out,) and y.dtype == np.float32
    # a probabilistic CARE net outputs (mean, scale); CARE.predict returns the mean, as predict_batch does
    np.testing.assert_allclose(y, ref[..., :n_out], atol=1e-5, rtol=0)
    assert np.std(y) > 1e-3  # the comparison is not between two constant images
    # whole network output, including the probabilistic scale (epsilon added by Rescaling, not Lambda)
    np.testing.assert_allclose(loaded.keras_model.predict_on_batch(x), ref, atol=1e-5, rtol=0)


def test_weights_last_can_be_chosen(csbdeep_models):
    loaded = load_model(csbdeep_models["d1k3_res"], weights="weights_last.h5")
    assert loaded.weights_file.name == "weights_last.h5"


def test_builder_matches_csbdeep_layer_for_layer():
    from csbdeep.internals.nets import common_unet

    for kw in (dict(unet_n_depth=1, unet_kern_size=3),
               dict(unet_n_depth=3, unet_kern_size=5, n_channel_in=2, n_channel_out=2, unet_residual=False,
                    probabilistic=True, unet_last_activation="relu")):
        spec = ModelSpec(unet_n_first=8, **kw)
        ours = build_unet(spec)
        ref = common_unet(n_dim=2, n_depth=spec.unet_n_depth, kern_size=spec.unet_kern_size, n_first=8,
                          n_channel_out=spec.n_channel_out, residual=spec.unet_residual,
                          prob_out=spec.probabilistic, last_activation=spec.unet_last_activation)(
            (None, None, spec.n_channel_in))
        # csbdeep adds the probabilistic epsilon with a Lambda layer; ours uses a built-in Rescaling layer
        kinds = [type(layer).__name__.replace("Rescaling", "Lambda") for layer in ours.layers]
        assert kinds == [type(layer).__name__ for layer in ref.layers]
        assert [w.shape for w in ours.weights] == [w.shape for w in ref.weights]
        named = [layer.name for layer in ref.layers if layer.name.startswith(("down_", "middle_", "up_level", "max_"))]
        assert named == [layer.name for layer in ours.layers if layer.name in named]


# ----------------------------------------------------------------------------------------------------------
# Folders written here run in CSBDeep
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["d2k5_2in2out_relu", "d1k5_prob"])
def test_exported_model_loads_in_csbdeep(csbdeep_models, tmp_path, case):
    from csbdeep.models import Config

    loaded = load_model(csbdeep_models[case])
    n_in, n_out = loaded.spec.n_channel_in, loaded.spec.n_channel_out
    meta = {
        "channels": {"input": [f"in{i}" for i in range(n_in)], "output": [f"out{i}" for i in range(n_out)]},
        "normalization": {"percentiles": [1, 99.9], "values": {"in0": [0.0, np.float32(1.5)]}},
        "loss": "mae", "preset": "actin", "provenance": {"command": "test"},
    }
    out = export_model(loaded.keras_model, loaded.spec, tmp_path / "exported", metadata=meta,
                       train_params={"train_learning_rate": 2e-4})
    assert out == tmp_path / "exported"
    cfg = json.loads((out / "config.json").read_text())
    config = Config(**cfg)  # what CARE(None, ...) does
    assert config.is_valid(), config.is_valid(True)
    assert cfg["train_learning_rate"] == 2e-4

    x = _input(loaded.spec)
    np.testing.assert_allclose(_csbdeep_predict(out, x)[..., :n_out], loaded.predict_batch(x), atol=1e-5, rtol=0)

    again = load_model(out)
    assert again.spec == loaded.spec
    assert again.metadata["channels"] == meta["channels"]
    assert again.metadata["normalization"]["values"]["in0"] == [0.0, 1.5]
    assert again.metadata["l2l_scale_version"]
    assert again.metadata["weights"]["weights_best.h5"]["sha256"] == again.checksum
    np.testing.assert_array_equal(again.predict_batch(x), loaded.predict_batch(x))


def test_export_weights_best_and_last(csbdeep_models, tmp_path):
    loaded = load_model(csbdeep_models["d1k3_res"])
    best = [w * 0.5 for w in loaded.keras_model.get_weights()]
    out = export_model(loaded.keras_model, loaded.spec, tmp_path / "m", metadata={}, weights_best=best)
    x = _input(loaded.spec)
    last = load_model(out, weights="weights_last.h5")
    np.testing.assert_array_equal(last.predict_batch(x), loaded.predict_batch(x))
    best_loaded = load_model(out)
    for got, want in zip(best_loaded.keras_model.get_weights(), best):
        np.testing.assert_array_equal(got, want)

    # an h5 checkpoint is accepted as weights_best too
    out2 = export_model(loaded.keras_model, loaded.spec, tmp_path / "m2", metadata={},
                        weights_best=csbdeep_models["d1k3_res"] / "weights_last.h5")
    assert (out2 / "weights_best.h5").is_file()


def test_export_refuses_overwrite_and_mismatch(csbdeep_models, tmp_path):
    loaded = load_model(csbdeep_models["d1k3_res"])
    export_model(loaded.keras_model, loaded.spec, tmp_path / "m", metadata={})
    with pytest.raises(OutputError, match="overwrite=True"):
        export_model(loaded.keras_model, loaded.spec, tmp_path / "m", metadata={})
    export_model(loaded.keras_model, loaded.spec, tmp_path / "m", metadata={}, overwrite=True)

    other = ModelSpec(unet_n_depth=2, unet_kern_size=3, unet_n_first=8)
    with pytest.raises(ModelError, match="does not fit"):
        export_model(loaded.keras_model, other, tmp_path / "bad", metadata={})
    with pytest.raises(ModelError, match="channels.input"):
        export_model(loaded.keras_model, loaded.spec, tmp_path / "bad2", metadata={"channels": {"input": ["a", "b"]}})
    assert not (tmp_path / "bad2" / "config.json").exists()


# ----------------------------------------------------------------------------------------------------------
# Receptive field
# ----------------------------------------------------------------------------------------------------------


def test_receptive_field_known_values():
    # Hand count for depth 2, kernel 5 (radius 2 per conv), 2 convs per block, influence of one input pixel:
    #   convs: level 0 (down 2 + up 2) 4 * 2 * 1 = 8; level 1 (down 2 + up 2) 4 * 2 * 2 = 16;
    #          level 2 (middle 2)      2 * 2 * 4 = 16                                       -> 40
    #   pooling alignment: a pixel shares its 2x2 pooling window with a neighbour, +1 at level 0 and
    #   +2 (one level-1 pixel) at level 1                                                  -> +3
    #   = 43, reached on one side (e.g. pixel 0 influences output pixels -40 .. +43).
    assert ModelSpec(unet_n_depth=2, unet_kern_size=5).receptive_field == 43
    assert ModelSpec(unet_n_depth=1, unet_kern_size=3).receptive_field == 9  # 2*1 + 2*2 (middle) + 2*1 + 1
    assert ModelSpec(unet_n_depth=2, unet_kern_size=3).receptive_field == 23
    assert ModelSpec(unet_n_depth=3, unet_kern_size=5).receptive_field == 95
    spec = ModelSpec(unet_n_depth=2, unet_kern_size=5)
    assert spec.grid == 4 and spec.halo == 44


def _measured_radius(spec: ModelSpec, seed: int = 0) -> int:
    """Largest distance between a perturbed input pixel and an output pixel that changes.

    Weights are random but positive and biases zero, on a zero background: every activation reached by the
    perturbation is > 0, so ReLU and max pooling pass it on and nothing cancels. One image per phase of the
    pixel with respect to the pooling grid.
    """
    model = build_unet(spec)
    rng = np.random.default_rng(seed)
    new = []
    for w in model.get_weights():
        if w.ndim == 4:  # kernel [k, k, c_in, c_out]: positive, scaled so activations stay moderate
            new.append((rng.uniform(0.5, 1.5, w.shape) / w.shape[2]).astype(np.float32))
        else:
            new.append(np.zeros_like(w))
    model.set_weights(new)
    g, rf = spec.grid, spec.receptive_field
    size = 2 * (rf + 2 * g)
    size += -size % g
    center = rf + g + g - (rf + g) % g  # a multiple of the grid, rf + g or more from the border
    x = np.zeros((g, size, size, spec.n_channel_in), np.float32)
    for o in range(g):
        x[o, center + o, center + o, :] = 1.0
    y = model.predict_on_batch(x)
    y0 = model.predict_on_batch(np.zeros_like(x))
    radius = 0
    for o in range(g):
        rows, cols = np.nonzero(np.any(y[o] != y0[o], axis=-1))
        assert rows.min() > 0 and rows.max() < size - 1  # the influence never reached the border
        p = center + o
        radius = max(radius, p - rows.min(), rows.max() - p, p - cols.min(), cols.max() - p)
    return radius


@pytest.mark.parametrize("depth,kern", [(1, 3), (2, 5), (3, 3)])
def test_receptive_field_matches_measurement(depth, kern):
    spec = ModelSpec(unet_n_depth=depth, unet_kern_size=kern, unet_n_first=8, unet_residual=False)
    measured = _measured_radius(spec)
    assert measured <= spec.receptive_field
    assert measured == spec.receptive_field  # the count is exact, not only an upper bound


def test_receptive_field_agrees_with_csbdeep_measurement():
    from csbdeep.internals.nets import receptive_field_unet

    spec = ModelSpec(unet_n_depth=2, unet_kern_size=5)
    (pre, post), _ = receptive_field_unet(2, 5, img_size=128)
    assert max(pre, post) <= spec.receptive_field
    assert max(pre, post) > spec.receptive_field - spec.grid


# ----------------------------------------------------------------------------------------------------------
# Errors and safety
# ----------------------------------------------------------------------------------------------------------


def test_missing_folder_config_and_weights(csbdeep_models, tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path / "empty")
    folder = _copy(csbdeep_models["d1k3_res"], tmp_path / "noweights")
    for f in folder.glob("*.h5"):
        f.unlink()
    with pytest.raises(ModelError, match="weights_best.h5"):
        load_model(folder)
    with pytest.raises(ModelError, match="weights file not found"):
        load_model(csbdeep_models["d1k3_res"], weights="weights_now.h5")
    with pytest.raises(ModelError, match="file name inside the model folder"):
        load_model(csbdeep_models["d1k3_res"], weights="../x.h5")


def test_bad_configs(csbdeep_models, tmp_path):
    folder = _copy(csbdeep_models["d1k3_res"], tmp_path / "m")
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())

    cfg_path.write_text(json.dumps({**cfg, "n_dim": 3, "axes": "ZYXC"}))
    with pytest.raises(ModelError, match="3D CARE models are not supported yet"):
        read_spec(folder)
    cfg_path.write_text("{not json")
    with pytest.raises(ModelError, match="config.json"):
        load_model(folder)
    cfg_path.write_text(json.dumps({**cfg, "n_rays": 32}))
    with pytest.raises(ModelError, match="StarDist"):
        read_spec(folder)
    cfg_path.write_text(json.dumps({**cfg, "unet_kern_size": 4}))
    with pytest.raises(ModelError, match="odd"):
        read_spec(folder)
    # a config that does not match the weights
    cfg_path.write_text(json.dumps({**cfg, "unet_n_first": 16}))
    with pytest.raises(ModelError, match="do not fit"):
        load_model(folder)
    with pytest.raises(ModelError, match="residual"):
        ModelSpec(n_channel_in=1, n_channel_out=2, unet_residual=True)


def test_corrupt_weights(csbdeep_models, tmp_path):
    folder = _copy(csbdeep_models["d1k3_res"], tmp_path / "m")
    good = (folder / "weights_best.h5").read_bytes()
    (folder / "weights_best.h5").write_bytes(good[: len(good) // 2])  # truncated download
    with pytest.raises(ModelError, match="weights_best.h5"):
        load_model(folder)
    (folder / "weights_best.h5").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(ModelError, match="corrupt"):
        load_model(folder)
    loaded = load_model(folder, weights="weights_last.h5")  # the fix the message suggests
    assert loaded.weights_file.name == "weights_last.h5"


def test_refuses_code_carrying_files(csbdeep_models, tmp_path):
    import keras

    src = csbdeep_models["d1k3_res"]
    pickled = _copy(src, tmp_path / "pkl")
    (pickled / "normalizer.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(ModelError, match="normalizer.pkl"):
        load_model(pickled)

    objects = _copy(src, tmp_path / "npy")
    np.save(objects / "stats.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ModelError, match="stats.npy"):
        load_model(objects)

    archive = _copy(src, tmp_path / "keras")
    (archive / "model.keras").write_bytes(b"PK\x03\x04")
    with pytest.raises(ModelError, match="model.keras"):
        load_model(archive)

    lam = _copy(src, tmp_path / "lambda")
    inp = keras.Input((4,))
    keras.Model(inp, keras.layers.Lambda(lambda t: t * 2)(inp)).save(str(lam / "extra.h5"))
    with pytest.raises(ModelError, match="Lambda"):
        load_model(lam)


def test_full_model_h5_without_code_loads_weights_only(csbdeep_models, tmp_path):
    folder = _copy(csbdeep_models["d1k3_res"], tmp_path / "full")
    loaded = load_model(folder)
    loaded.keras_model.save(str(folder / "weights_best.h5"))  # legacy full-model h5 (model_config + weights)
    again = load_model(folder)
    x = _input(loaded.spec)
    np.testing.assert_array_equal(again.predict_batch(x), loaded.predict_batch(x))


def test_harmless_extra_files_are_tolerated(csbdeep_models, tmp_path):
    folder = _copy(csbdeep_models["d1k3_res"], tmp_path / "extras")
    (folder / "README.md").write_text("trained on actin")
    (folder / "logs" / "train").mkdir(parents=True)
    (folder / "logs" / "train" / "events.out.tfevents.1.host").write_bytes(b"\x00" * 64)
    (folder / "thumbnail.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "TF_SavedModel.zip").write_bytes(b"PK\x05\x06" + b"\x00" * 18)
    np.save(folder / "example_input.npy", np.zeros((4, 4), np.float32))
    (folder / "broken_old_weights.h5").write_bytes(b"junk")  # not loaded, so not an error
    assert load_model(folder).weights_file.name == "weights_best.h5"


def test_predict_batch_checks_input(csbdeep_models):
    loaded = load_model(csbdeep_models["d3k3_2in1out"])
    with pytest.raises(ChannelError, match="2 input channel"):
        loaded.predict_batch(np.zeros((1, 16, 16, 1), np.float32))
    with pytest.raises(ModelError, match="multiple of the U-Net grid 8"):
        loaded.predict_batch(np.zeros((1, 20, 16, 2), np.float32))


# ----------------------------------------------------------------------------------------------------------
# Cache and threads
# ----------------------------------------------------------------------------------------------------------


def test_client_side_helpers_do_not_import_tensorflow(csbdeep_models, tmp_path):
    loaded = load_model(csbdeep_models["d1k3_res"])
    out = export_model(loaded.keras_model, loaded.spec, tmp_path / "m", metadata={"channels": {"input": ["AC-15"]}})
    assert weights_path(out) == out.resolve() / "weights_best.h5"
    assert weights_path(out, "weights_last.h5").name == "weights_last.h5"
    assert read_metadata(out)["channels"] == {"input": ["AC-15"]}
    assert read_metadata(csbdeep_models["d1k3_res"]) == {}
    code = (
        "import sys; from l2l_scale.model import read_spec, read_metadata, weights_path; "
        f"s = read_spec({str(out)!r}); read_metadata({str(out)!r}); weights_path({str(out)!r}); "
        "assert s.receptive_field == 9 and s.halo == 10; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TF imported'"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


def test_threads_share_one_model_and_predict_correctly(csbdeep_models, tmp_path):
    folder = _copy(csbdeep_models["d2k5_2in2out_relu"], tmp_path / "threads")
    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(lambda _: get_cached_model(str(folder)), range(4)))
    assert all(m is models[0] for m in models)
    model = models[0]
    rng = np.random.default_rng(3)
    xs = [rng.random((1, s, s, 2), dtype=np.float32) for s in (32, 48, 64, 32, 48, 64)]  # several tile sizes
    with ThreadPoolExecutor(3) as pool:
        ys = list(pool.map(model.predict_batch, xs))
    for x, y in zip(xs, ys):
        np.testing.assert_allclose(y, model.keras_model(x, training=False).numpy(), atol=1e-6, rtol=0)


def test_get_cached_model_loads_once(csbdeep_models, tmp_path):
    folder = _copy(csbdeep_models["d1k3_res"], tmp_path / "cached")
    first = get_cached_model(str(folder))
    assert get_cached_model(str(folder)) is first
    assert get_cached_model(str(folder), "weights_last.h5") is not first
    st = (folder / "weights_best.h5").stat()
    os.utime(folder / "weights_best.h5", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # re-exported in place
    assert get_cached_model(str(folder)) is not first


def _race(fn, n: int = 8) -> list:
    """Call ``fn()`` from ``n`` threads released together, so they ask for a not yet created object at once."""
    import threading

    barrier = threading.Barrier(n)

    def run(_):
        barrier.wait()
        return fn()

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def test_threads_racing_for_a_new_model_lock_get_the_same_lock(monkeypatch):
    """The per-model lock of predict is created atomically: a slow constructor widens the race window."""
    import threading
    import time
    import types

    from l2l_scale import predict

    def slow_lock():
        time.sleep(0.02)  # every racing thread has looked the key up before the first lock is stored
        return threading.Lock()

    monkeypatch.setattr(predict, "_MODEL_LOCKS", {})
    monkeypatch.setattr(predict, "threading", types.SimpleNamespace(Lock=slow_lock))
    key = ("/models/m", None, "fp32")
    locks = _race(lambda: predict._model_lock(key))
    assert all(lock is locks[0] for lock in locks)
    assert predict._model_lock(key) is locks[0] and list(predict._MODEL_LOCKS) == [key]


def test_threads_racing_for_a_new_forward_pass_build_it_once(csbdeep_models, tmp_path, monkeypatch):
    from l2l_scale.model import backend

    folder = _copy(csbdeep_models["d1k3_res"], tmp_path / "race")
    model = load_model(folder)
    real, built = backend.make_predict_fn, []

    def slow_make(*args):
        import time

        built.append(1)
        time.sleep(0.05)
        return real(*args)

    monkeypatch.setattr(backend, "make_predict_fn", slow_make)
    x = np.random.default_rng(0).random((1, 32, 32, 1), dtype=np.float32)
    ys = _race(lambda: model.predict_batch(x))
    assert len(built) == 1
    for y in ys:
        np.testing.assert_array_equal(y, ys[0])


def test_configure_tf_threads_after_init_is_a_noop():
    import tensorflow as tf

    tf.constant(1.0) + 1.0  # make sure the TF context exists
    configure_tf_threads(2)
    with pytest.raises(ConfigError):
        configure_tf_threads(-1)
