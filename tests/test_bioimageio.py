"""bioimage.io packages: export of a model trained by ``l2l-scale train``, checked by the real tools
(bioimageio.spec validation, bioimageio.core ``test_model`` for the keras_hdf5 and onnx weights, onnxruntime),
and import of packages and CSBDeep ``export_TF`` zips in ``predict``.

One tiny model (depth 2, 8 filters, 3 training steps) is trained once per module. Nothing is downloaded:
bioimageio.spec/core only read the local zip.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
import xarray as xr

from l2l_scale.cli import main
from l2l_scale.io.read import open_image
from l2l_scale.io.write import write_image, write_plate

pytest.importorskip("bioimageio.core", reason="bioimage.io tests need the [bioimageio] extra (bioimageio.core)")
pytest.importorskip("onnxruntime", reason="bioimage.io tests need the [bioimageio] extra (onnxruntime)")
pytestmark = pytest.mark.timeout(600)


def _field(seed: int, size: int = 96) -> np.ndarray:
    from l2l_scale.synthetic import simulate

    return np.asarray(simulate("actin", size, seed=seed).isel(c=[0, 1]).values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from l2l_scale.patches import create_patches
    from l2l_scale.train import train

    base = tmp_path_factory.mktemp("bioimageio")
    fields = {f"A/1/{i}": xr.DataArray(_field(i), dims=("c", "y", "x"), coords={"c": ["AC-15", "phalloidin"]},
                                       attrs={"pixel_size": 0.05}) for i in range(2)}
    write_plate(fields, base / "plate.zarr", chunks=64)
    store = create_patches(base / "plate.zarr", base / "patches.zarr", input_channels=["AC-15"],
                           target_channels=["phalloidin"], patch_size=32, patches_per_image=8,
                           percentiles=(1, 99.9), split_by="patch", validation_fraction=0.25, chunk_patches=8)
    model = train(store, base / "model", epochs=1, steps_per_epoch=3, batch_size=4, unet_n_depth=2,
                  unet_n_first=8, unet_kern_size=3, strategy="none", loss="l1")
    return base, model


@pytest.fixture(scope="module")
def package(trained):
    base, model = trained
    out = base / "l2l.zip"
    assert main(["export-bioimageio", str(model), str(out), "--author", "Test Author"]) == 0
    return out


def test_package_validates_and_describes_the_model(package, trained):
    from bioimageio.spec import load_model_description
    from bioimageio.spec.model import v0_5

    from l2l_scale.model import read_metadata, read_spec

    descr = load_model_description(package, perform_io_checks=True)
    assert isinstance(descr, v0_5.ModelDescr), getattr(descr, "validation_summary", descr)
    spec, meta = read_spec(trained[1]), read_metadata(trained[1])
    (inp,), (out,) = descr.inputs, descr.outputs
    assert [str(a.id) for a in inp.axes] == ["batch", "y", "x", "channel"]
    assert inp.axes[-1].channel_names == ["AC-15"] and out.axes[-1].channel_names == ["AC-15-restored"]
    (pre,) = [p for p in inp.preprocessing if p.id == "scale_range"]
    assert [pre.kwargs.min_percentile, pre.kwargs.max_percentile] == meta["normalization"]["percentiles"]
    assert out.axes[1].halo == spec.halo >= spec.receptive_field and inp.axes[1].size.step == spec.grid
    assert {"keras_hdf5", "onnx", "tensorflow_saved_model_bundle"} <= {
        k for k, v in descr.weights.model_dump().items() if v}
    assert descr.cite[0].doi == "10.1242/jcs.258994" and descr.covers and descr.authors[0].name == "Test Author"
    assert descr.config.model_extra["l2l_scale"]["metadata"]["provenance"]["training"]["epochs_trained"] == 1
    names = set(zipfile.ZipFile(package).namelist())
    assert {"rdf.yaml", "config.json", "l2l_scale.json", "model.h5", "model.onnx", "cover.png"} <= names


def test_test_output_is_l2l_scale_predict(package, trained, tmp_path):
    """The package's test output is exactly what ``l2l-scale predict`` writes for its test input."""
    from l2l_scale.predict import predict

    with zipfile.ZipFile(package) as zf:
        x = np.load(zf.open("test_input.npy"))
        y = np.load(zf.open("test_output.npy"))
    img = xr.DataArray(np.moveaxis(x[0], -1, 0), dims=("c", "y", "x"), coords={"c": ["AC-15"]},
                       attrs={"pixel_size": 0.05})
    write_image(img, tmp_path / "in.zarr", chunks=64)
    out = predict(trained[1], tmp_path / "in.zarr", tmp_path / "out.zarr", tile=64)  # other tiling, same result
    np.testing.assert_allclose(np.asarray(open_image(out).values), np.moveaxis(y[0], -1, 0), atol=1e-5)


def test_export_with_a_users_test_image(trained, tmp_path):
    """--test-image: a centre crop to whole grid cells; keras_hdf5 only."""
    from l2l_scale.model.bioimageio import export_bioimageio

    raw = _field(13, size=102)  # 102 -> 100, whole cells of the depth-2 grid (4)
    src = _image(tmp_path, raw, ["phalloidin", "AC-15"])
    out = export_bioimageio(trained[1], tmp_path / "own.zip", authors=["A"], test_image=src,
                            weight_formats=["keras_hdf5"])
    with zipfile.ZipFile(out) as zf:
        x = np.load(zf.open("test_input.npy"))
        assert "model.onnx" not in zf.namelist()
    assert x.shape == (1, 100, 100, 1)
    np.testing.assert_array_equal(x[0, ..., 0], raw[1, 1:101, 1:101])


def _test_model(package, weight_format, tmp_path, monkeypatch):
    """bioimageio.core's ``test_model``, with this process's environment kept as it was.

    ``test_model`` sets ``KERAS_BACKEND`` (default "torch") and ``TF_ENABLE_ONEDNN_OPTS=0`` in ``os.environ`` and
    never resets them. Left behind, every Dask worker started later in the session would run TensorFlow without
    oneDNN while this process keeps it, so their results would differ in the last bit and the bit-identity tests
    (resume, worker kills, crossval on workers) would fail. TensorFlow is imported first for the same reason: if
    ``test_model`` imported it, this process would run without oneDNN for the rest of the session.
    """
    import tensorflow  # noqa: F401
    from bioimageio.core import test_model

    monkeypatch.chdir(tmp_path)  # bioimageio.core unzips TF weights into ./bioimageio_unzipped_tf_weights
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1"))
    return test_model(package, weight_format=weight_format)


@pytest.mark.parametrize("weight_format", ["keras_hdf5", "onnx", "tensorflow_saved_model_bundle"])
def test_bioimageio_core_test_model(package, weight_format, tmp_path, monkeypatch):
    summary = _test_model(package, weight_format, tmp_path, monkeypatch)
    failed = [d for d in summary.details if d.status == "failed"]
    assert summary.status == "passed", [(d.name, [e.msg for e in d.errors]) for d in failed]


def test_bioimageio_core_tiling_equals_predict_inside_the_halo(package, trained, monkeypatch):
    """bioimageio.core's blocked prediction (whole-sample normalisation, tiles with the package's halo) equals
    l2l-scale's predict except within one halo of the image border, which it pads symmetrically (CSBDeep and
    l2l-scale let the convolutions zero-pad there)."""
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    from bioimageio.core import create_prediction_pipeline
    from bioimageio.core.digest_spec import get_test_input_sample, get_test_output_sample
    from bioimageio.spec import load_model_description

    from l2l_scale.model import read_spec

    descr = load_model_description(package)
    halo = read_spec(trained[1]).halo
    want = np.asarray(get_test_output_sample(descr).members["output"].data)[0, ..., 0]
    with create_prediction_pipeline(descr, weight_format="onnx") as pipeline:
        got = pipeline.predict_sample_with_blocking(get_test_input_sample(descr))
    got = np.asarray(got.members["output"].data)[0, ..., 0]
    inner = (slice(halo, -halo),) * 2
    np.testing.assert_allclose(got[inner], want[inner], atol=1e-4)


def test_export_refuses_bad_inputs(trained, package, capsys):
    model = str(trained[1])
    cases = [
        ([model, str(package), "--author", "A"], "exists"),
        ([model, str(trained[0] / "x.tar"), "--author", "A"], "must end in .zip"),
        ([model, str(trained[0] / "y.zip"), "--author", " "], "at least one author"),
        ([str(trained[0] / "nope"), str(trained[0] / "z.zip"), "--author", "A"], "not found"),
    ]
    small = _image(trained[0], _field(9, size=40)[:1], ["AC-15"])
    cases.append(([model, str(trained[0] / "s.zip"), "--author", "A", "--test-image", str(small)], "at least 52x52"))
    for argv, match in cases:
        assert main(["export-bioimageio", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, (argv, err)
    assert not (trained[0] / "y.zip").exists() and not list(trained[0].glob(".l2l-bioimageio-*"))


# ------------------------------------------------------------------------------------------------ import


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("L2L_SCALE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _image(tmp_path, raw, names):
    img = xr.DataArray(raw, dims=("c", "y", "x"), coords={"c": names}, attrs={"pixel_size": 0.05})
    return write_image(img, tmp_path / "img.zarr", chunks=64)


def test_predict_runs_our_package_zip_and_folder(package, trained, tmp_path, cache):
    from l2l_scale.predict import predict

    src = _image(tmp_path, _field(21, size=100)[:1], ["AC-15"])
    ref = open_image(predict(trained[1], src, tmp_path / "ref.zarr")).values
    folder = tmp_path / "unzipped"
    zipfile.ZipFile(package).extractall(folder)
    for i, pkg in enumerate((package, folder)):
        out = open_image(predict(pkg, src, tmp_path / f"pkg{i}.zarr")).values  # channels from the package
        np.testing.assert_allclose(out, ref, atol=1e-6)
    (converted,) = [p for p in cache.glob("models/bioimageio-*") if p.name.startswith("bioimageio-")][:1]
    meta = json.loads((converted / "l2l_scale.json").read_text())
    assert meta["normalization"]["percentiles"] == [1.0, 99.9] and meta["imported_from"]["halo"] == 24


def test_architecture_from_the_h5_layer_config_alone(package, trained, tmp_path):
    """A foreign package without our config.json: the U-Net is derived from the full-model h5."""
    from l2l_scale.model import read_spec
    from l2l_scale.model.formats import _spec_from_keras_config

    zipfile.ZipFile(package).extract("model.h5", tmp_path)
    assert _spec_from_keras_config(tmp_path / "model.h5") == read_spec(trained[1])


def test_unsupported_packages_get_one_line(package, tmp_path, cache, capsys):
    from bioimageio.spec import load_model_description, save_bioimageio_package
    from bioimageio.spec.model import v0_5

    descr = load_model_description(package)
    onnx_only = descr.model_copy(update={"weights": v0_5.WeightsDescr(
        onnx=descr.weights.onnx.model_copy(update={"parent": None}))})
    save_bioimageio_package(onnx_only, output_path=tmp_path / "onnx.zip")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "rdf.yaml").write_text("type: model\nformat_version: 0.5.4\nname: x\n")
    src = _image(tmp_path, _field(3, size=64)[:1], ["AC-15"])
    for pkg, match in ((tmp_path / "onnx.zip", "unsupported weights (onnx)"),
                       (broken, "not a valid bioimage.io model package")):
        assert main(["predict", str(pkg), str(src), str(tmp_path / "o.zarr"), "--channel", "AC-15",
                     "--scheduler", "threads"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "o.zarr").exists()


def _export_tf_zip(care, path):
    """What CSBDeep's ``export_TF`` writes (TF1 graph SavedModel zip + meta.json), which it refuses under Keras 3.

    The graph is built with tf.compat.v1 ops and Keras 2's names (``<layer>/kernel``, ``<layer>/BiasAdd``,
    ``add_1/add``, placeholder ``input``), the weights are the CSBDeep model's own; CSBDeep's ``meta.json`` keys.
    """
    import shutil

    import tensorflow as tf

    from l2l_scale.model import read_spec
    from l2l_scale.model.spec import _layer_plan

    spec = read_spec(care.logdir)
    layers = {layer.name: layer.get_weights() for layer in care.keras_model.layers}  # eagerly, before the graph
    (head,) = [n for n in layers if n.startswith("conv2d")]
    tv1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        x = tv1.placeholder(tf.float32, [None, None, None, spec.n_channel_in], name="input")
        t, skips = x, []
        for op in _layer_plan(spec):
            kind = op[0]
            if kind in ("conv", "head"):
                name = op[1] if kind == "conv" else "conv2d_1"
                k, b = layers[op[1] if kind == "conv" else head]
                with tv1.variable_scope(name):
                    kv = tv1.get_variable("kernel", initializer=k)
                    bv = tv1.get_variable("bias", initializer=b)
                t = tf.nn.bias_add(tf.nn.conv2d(t, kv, 1, "SAME", name=f"{name}/convolution"), bv,
                                   name=f"{name}/BiasAdd")
                if kind == "conv":
                    t = tf.nn.relu(t, name=f"{name}/Relu")
            elif kind == "pool":
                skips.append(t)
                t = tf.nn.max_pool2d(t, 2, 2, "VALID", name=f"{op[1]}/MaxPool")
            elif kind == "up":
                t = tf.repeat(tf.repeat(t, 2, axis=1), 2, axis=2, name=f"{op[1]}/resize")
            elif kind == "concat":
                t = tf.concat([t, skips.pop()], axis=-1, name=f"{op[1]}/concat")
            elif kind == "residual":
                t = tf.add(t, x, name="add_1/add")
            elif kind == "activation" and op[2] == "relu":
                t = tf.nn.relu(t, name="activation_1/Relu")
        with tv1.Session(graph=graph) as sess:
            sess.run(tv1.global_variables_initializer())
            folder = path.parent / "export_tf"
            builder = tv1.saved_model.builder.SavedModelBuilder(str(folder))
            sig = tv1.saved_model.signature_def_utils.predict_signature_def(inputs={"input": x},
                                                                            outputs={"output": t})
            builder.add_meta_graph_and_variables(sess, [tv1.saved_model.tag_constants.SERVING],
                                                 signature_def_map={"serving_default": sig})
            builder.save()
    (folder / "meta.json").write_text(json.dumps({
        "type": "CARE", "version": "0.8.2", "probabilistic": False, "axes": "YXC",
        "axes_div_by": [2 ** spec.unet_n_depth] * 2 + [1], "tile_overlap": [spec.receptive_field] * 2 + [0]}))
    shutil.make_archive(str(path.with_suffix("")), "zip", folder)
    return path


@pytest.mark.parametrize("last_activation", ["linear", "relu"])
def test_csbdeep_export_tf_zip_equals_csbdeep_predict(tmp_path, cache, last_activation, monkeypatch):
    import csbdeep
    from csbdeep.models import CARE, Config

    from l2l_scale.predict import predict

    with pytest.raises(NotImplementedError):  # why the test writes the zip itself (see _export_tf_zip)
        csbdeep.utils.tf.export_SavedModel(None, str(tmp_path / "x.zip"))
    cfg = Config("YX", n_channel_in=1, n_channel_out=1, unet_n_depth=2, unet_n_first=8, unet_kern_size=3,
                 unet_last_activation=last_activation, train_tensorboard=False)
    care = CARE(cfg, "care", basedir=str(tmp_path))
    rng = np.random.default_rng(0)
    care.keras_model.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype)
                                  for w in care.keras_model.get_weights()])  # non-zero biases
    zip_path = _export_tf_zip(care, tmp_path / "TF_SavedModel.zip")
    raw = _field(5, size=100)[:1]
    raw = raw[:, :, :90]  # odd sizes: CSBDeep and predict pad to the grid
    ref = care.predict(raw[0].astype(np.float32), "YX")  # CSBDeep's default: rescaled to the input range
    src = _image(tmp_path, raw, ["raw"])
    ours = open_image(predict(zip_path, src, tmp_path / "out.zarr", channels=["raw"])).values[0]
    a, b = np.polyfit(ours.ravel().astype(np.float64), ref.ravel().astype(np.float64), 1)
    lo, hi = np.percentile(raw[0], [2, 99.8])
    assert a == pytest.approx(hi - lo, rel=1e-4) and b == pytest.approx(lo, rel=1e-4, abs=1e-2)
    np.testing.assert_allclose(ours, (ref - b) / a, atol=1e-4)
    if last_activation == "linear":  # such a zip also becomes a bioimage.io package that test_model accepts
        from l2l_scale.model.bioimageio import export_bioimageio

        pkg = export_bioimageio(zip_path, tmp_path / "care.zip", authors=["A"], weight_formats=["keras_hdf5"])
        assert _test_model(pkg, "keras_hdf5", tmp_path, monkeypatch).status == "passed"
