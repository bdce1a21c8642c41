"""bf16/fp16 precision (accuracy budget, refusals, resume, training) and Keras backends other than TensorFlow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from l2l_scale.errors import ConfigError, OutputError
from l2l_scale.evaluate.metrics import ms_ssim, psnr
from l2l_scale.io.read import open_image
from l2l_scale.io.write import write_image, write_plate
from l2l_scale.model import backend as mb

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small L2L model trained on simulated actin (AC-15 -> phalloidin) and a held-out field with its truth."""
    from l2l_scale.patches import create_patches
    from l2l_scale.synthetic import simulate
    from l2l_scale.train import train

    base = tmp_path_factory.mktemp("precision")
    plate = base / "actin.zarr"
    write_plate({f"A/1/{i}": simulate("actin", 256, seed=s) for i, s in enumerate((0, 1))}, plate)
    store = create_patches(plate, base / "patches.zarr", mode="l2l", input_channels=["AC-15"],
                           target_channels=["phalloidin"], patch_size=64, patches_per_image=64, augment=False,
                           percentiles=(1, 99.9), split_by="patch", validation_fraction=0.1)
    model = train(store, base / "model", epochs=3, steps_per_epoch=25, batch_size=8, learning_rate=1e-3,
                  unet_n_depth=2, unet_n_first=16, unet_kern_size=3, strategy="none", seed=0, tensorboard=False)
    test = simulate("actin", 384, seed=10)
    image = write_image(test.sel(c=["AC-15"]), base / "test.zarr", chunks=128)
    return {"base": base, "store": store, "model": model, "image": image,
            "truth": test.sel(c="truth").values.astype(np.float64)}


def _fit(pred: np.ndarray, truth_n: np.ndarray) -> np.ndarray:
    """The least-squares affine map of the prediction onto the normalised truth (its best intensity scale)."""
    a = np.stack([pred.ravel(), np.ones(pred.size)], axis=1)
    coef = np.linalg.lstsq(a, truth_n.ravel(), rcond=None)[0]
    return (a @ coef).reshape(pred.shape)


def _allow_bf16(monkeypatch) -> None:
    """Let bf16 run on a CPU without bf16 instructions (CI's may lack them): it is then emulated, slowly but
    with the same bf16 rounding, which is what these tests are about. The refusal has its own test below."""
    monkeypatch.setattr(mb, "cpu_features", lambda: {"bf16"})


def test_bf16_accuracy_budget_tiled_equals_whole_and_provenance(trained, tmp_path, monkeypatch):
    from l2l_scale.model import load_model
    from l2l_scale.predict import predict

    _allow_bf16(monkeypatch)
    out = {p: predict(trained["model"], trained["image"], tmp_path / f"{p}.zarr", tile=64, chunks=128,
                      precision=p) for p in ("fp32", "bf16")}
    img = {p: open_image(o) for p, o in out.items()}
    y = {p: i.values[0].astype(np.float64) for p, i in img.items()}
    assert img["bf16"].attrs["l2l_scale"]["parameters"]["precision"] == "bf16"
    assert img["fp32"].attrs["l2l_scale"]["parameters"]["precision"] == "fp32"

    # bf16 against fp32, over the fp32 output's range
    rng = float(y["fp32"].max() - y["fp32"].min())
    assert psnr(y["fp32"], y["bf16"], data_range=rng) >= 45.0
    # both against the simulator's truth: bf16 costs at most 0.1 dB and 0.005 MS-SSIM(5)
    truth = trained["truth"]
    lo, hi = np.percentile(truth, [0.1, 99.9])
    truth_n = (truth - lo) / (hi - lo)
    fitted = {p: _fit(v, truth_n) for p, v in y.items()}
    p_db = {p: psnr(truth_n, f, data_range=1.0) for p, f in fitted.items()}
    s5 = {p: ms_ssim(truth_n, f, scales=5, data_range=1.0) for p, f in fitted.items()}
    print("accuracy budget:", json.dumps({"psnr_bf16_vs_fp32": psnr(y["fp32"], y["bf16"], data_range=rng),
                                          "psnr_truth": p_db, "ms_ssim5_truth": s5}))
    assert p_db["fp32"] > psnr(truth_n, _fit(open_image(trained["image"]).values[0].astype(float), truth_n),
                               data_range=1.0)  # the model learned something, so the comparison means something
    assert abs(p_db["bf16"] - p_db["fp32"]) <= 0.1
    assert abs(s5["bf16"] - s5["fp32"]) <= 0.005

    # tiled equals whole at bf16 (0.0 difference measured on this CPU; the bound allows other summation orders)
    values = img["bf16"].attrs["l2l_scale"]["normalization"]["values"]["AC-15"]
    raw = open_image(trained["image"]).values[0].astype(np.float32)
    x = (raw - np.float32(values[0])) / np.float32(values[1] - values[0])
    whole = load_model(trained["model"], precision="bf16").predict_batch(x[None, ..., None])[0, ..., 0]
    np.testing.assert_allclose(y["bf16"], whole, atol=1e-3 * rng, rtol=0)


def test_resume_refuses_another_precision(trained, tmp_path, monkeypatch):
    import l2l_scale.cluster
    from l2l_scale.predict import predict

    def crash(*a, **k):
        raise RuntimeError("simulated crash")

    _allow_bf16(monkeypatch)
    out = tmp_path / "out.zarr"
    with monkeypatch.context() as m:
        m.setattr(l2l_scale.cluster, "compute_waves", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            predict(trained["model"], trained["image"], out, tile=128, resume=True, precision="bf16")
    with pytest.raises(OutputError, match="different precision"):
        predict(trained["model"], trained["image"], out, tile=128, resume=True)


def test_precision_refused_on_cpus_without_it_one_line_exit_2(trained, tmp_path, monkeypatch, capsys):
    from l2l_scale.cli import main

    monkeypatch.setattr(mb, "cpu_features", lambda: set())
    rc = main(["predict", str(trained["model"]), str(trained["image"]), str(tmp_path / "o.zarr"), "--precision",
               "bf16", "--scheduler", "threads"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "no bf16 instructions" in err and "--precision fp32" in err
    assert not (tmp_path / "o.zarr").exists()
    assert mb.check_precision("bf16", accelerator=True) == "bf16"  # a GPU runs it whatever the CPU
    monkeypatch.setattr(mb, "cpu_features", lambda: {"bf16"})
    assert mb.check_precision("bf16") == "bf16"
    with pytest.raises(ConfigError, match="no fp16 instructions"):
        mb.check_precision("fp16")
    with pytest.raises(ConfigError, match="use one of fp32, bf16, fp16"):
        mb.check_precision("fp8")


def test_mixed_policy_keeps_the_head_and_residual_in_float32():
    from l2l_scale.model import ModelSpec, build_unet

    spec = ModelSpec(unet_n_depth=1, unet_n_first=8, unet_kern_size=3, probabilistic=True, unet_residual=True)
    ref = build_unet(spec)
    for precision, body in (("bf16", "mixed_bfloat16"), ("fp16", "mixed_float16")):
        net = build_unet(spec, precision)
        policies = {layer.name: layer.dtype_policy.name for layer in net.layers}
        head = {"conv2d", "add", "activation", "conv2d_1", "scale_eps", "concatenate_1"}
        assert {policies[n] for n in head} == {"float32"}
        assert {v for n, v in policies.items() if n not in head and n != "input"} == {body}
        assert [w.dtype for w in net.weights] == [w.dtype for w in ref.weights]  # float32 variables: same files
        assert net.output.dtype == "float32"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training(trained, tmp_path, monkeypatch, precision):
    import keras

    from l2l_scale.model import load_model
    from l2l_scale.train import train

    monkeypatch.setattr(mb, "cpu_features", lambda: {"bf16", "fp16"})  # fp16 runs (slowly) on any CPU
    seen = {}
    out = train(trained["store"], tmp_path / "m", epochs=1, steps_per_epoch=3, batch_size=4, unet_n_depth=1,
                unet_n_first=8, unet_kern_size=3, strategy="mirrored", tensorboard=False, precision=precision,
                hooks=[lambda e, row, m: seen.update(row=row, optimizer=m.optimizer,
                                                     policy=m.layers[1].dtype_policy.name)])
    assert seen["policy"] == {"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[precision]
    assert isinstance(seen["optimizer"], keras.optimizers.LossScaleOptimizer) == (precision == "fp16")
    assert np.isfinite(seen["row"]["loss"])
    meta = json.loads((out / "l2l_scale.json").read_text())
    assert meta["provenance"]["parameters"]["precision"] == precision
    y = load_model(out).predict_batch(np.full((1, 32, 32, 1), 0.5, np.float32))  # loads at fp32
    assert np.isfinite(y).all()


def test_training_refuses_precision_and_backend_before_writing(trained, tmp_path, monkeypatch):
    from l2l_scale.train import train

    monkeypatch.setattr(mb, "cpu_features", lambda: set())
    with pytest.raises(ConfigError, match="no bf16 instructions"):
        train(trained["store"], tmp_path / "m", epochs=1, steps_per_epoch=1, precision="bf16", strategy="none")
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    with pytest.raises(ConfigError, match="training runs on TensorFlow"):
        train(trained["store"], tmp_path / "m", epochs=1, steps_per_epoch=1, strategy="none")
    assert not (tmp_path / "m").exists()


def test_missing_backend_is_one_line_with_the_install_command(trained, tmp_path, monkeypatch, capsys):
    from l2l_scale.cli import main

    monkeypatch.setenv("KERAS_BACKEND", "jax")
    monkeypatch.setattr(mb, "_installed", lambda name: False)
    rc = main(["predict", str(trained["model"]), str(trained["image"]), str(tmp_path / "o.zarr")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "KERAS_BACKEND=jax" in err and "pip install 'l2l-scale[jax]'" in err
    monkeypatch.setenv("KERAS_BACKEND", "mxnet")
    with pytest.raises(ConfigError, match="not supported by l2l-scale"):
        mb.check_backend()


_BACKEND_SCRIPT = """
import json, sys
from l2l_scale.predict import predict
assert "tensorflow" not in sys.modules, "importing l2l_scale.predict imported TensorFlow"
import keras
out = predict(sys.argv[1], sys.argv[2], sys.argv[3], tile=64, chunks=128)
print(json.dumps({"backend": keras.config.backend(), "tensorflow": "tensorflow" in sys.modules}))
"""


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_other_keras_backend_predicts_like_tensorflow_without_importing_it(trained, tmp_path, backend):
    from l2l_scale.predict import predict

    if not mb._installed(backend):
        pytest.skip(f"{backend} is not installed (pip install 'l2l-scale[{backend}]')")
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    r = subprocess.run([sys.executable, "-c", _BACKEND_SCRIPT, str(trained["model"]), str(trained["image"]),
                        str(tmp_path / "other.zarr")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info == {"backend": backend, "tensorflow": False}
    ref = predict(trained["model"], trained["image"], tmp_path / "tf.zarr", tile=64, chunks=128)
    np.testing.assert_allclose(open_image(tmp_path / "other.zarr").values, open_image(ref).values,
                               atol=1e-4, rtol=0)


def test_gpu_check_quick_runs_on_cpu_without_tensorflow():
    if not (mb._installed("jax") or mb._installed("torch")):
        pytest.skip("gpu_check needs JAX or PyTorch (pip install 'l2l-scale[jax]')")
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--quick"], capture_output=True,
                       text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["backend"] in ("jax", "torch") and report["tensorflow_imported"] is False
    fp32 = report["precisions"]["fp32"]
    assert fp32["raw_mpx_s"] > 0 and fp32["predict_mpx_s"] > 0
    assert fp32["predict_over_raw"] == pytest.approx(fp32["predict_mpx_s"] / fp32["raw_mpx_s"], rel=0.01)
    assert report["memory"]["peak_gb"] > 0
