"""bioimage.io model packages (format 0.5) of l2l-scale/CSBDeep CARE models.

:func:`export_bioimageio` builds the package with ``bioimageio.spec``'s model classes (never hand-written YAML):

- weights as ``keras_hdf5`` (a full Keras model in the legacy h5 format, what bioimageio.core, deepImageJ and
  CSBDeep's Keras 2 read), ``onnx`` (Keras 3's ONNX export, checked with onnxruntime against Keras) and, where
  TensorFlow is present, ``tensorflow_saved_model_bundle``;
- input/output axes ``batch, y, x, channel`` (the network's own layout) with the channel names;
- the normalisation as ``scale_range`` with the model's percentiles, per channel over ``y, x``;
- tile hints: the input size is ``min + n * grid`` and the output halo is the receptive field rounded to the
  grid (:attr:`ModelSpec.halo`), so bioimageio.core's tiling equals the whole-image pass;
- test tensors made by l2l-scale's own :func:`l2l_scale.predict.predict` on a simulated image;
- a cover image, authors, license, the Label2label and CARE citations and the training provenance
  (``config.json`` and ``l2l_scale.json`` as attachments, ``config.l2l_scale`` in the RDF).

The package is validated by bioimageio.spec while it is built, and written to a temporary name and renamed, so
a failed export never leaves a zip that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from l2l_scale.errors import ConfigError, ModelError, OutputError

ONNX_TOLERANCE = 1e-4  # onnxruntime vs Keras, absolute, on the test input (normalised units)
WEIGHT_FORMATS = ("keras_hdf5", "onnx", "tensorflow_saved_model_bundle")
L2L_CITATION = (
    "Kölln LS, Salem O, Valli J, Hansen CG, McConnell G. Label2label: training a neural network to selectively "
    "restore cellular structures in fluorescence microscopy. J Cell Sci 135 (2022)",
    "10.1242/jcs.258994",
)
CARE_CITATION = (
    "Weigert M, et al. Content-aware image restoration: pushing the limits of fluorescence microscopy. "
    "Nat Methods 15, 1090-1097 (2018)",
    "10.1038/s41592-018-0216-7",
)
_MIN_TEST_SIZE = 128


def _require_bioimageio():
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError:
        raise ModelError("bioimage.io export needs bioimageio.spec and onnx; install them with "
                         "pip install 'l2l-scale[bioimageio]'") from None


def _test_image(loaded, test_image: str | Path | None, channels: Sequence[str], size: int, grid: int,
                min_size: int):
    """An xarray image with the model's input channel names: the user's OME-Zarr, else a simulated field."""
    from l2l_scale.io.read import open_image

    if test_image is not None:
        img = open_image(test_image)
        missing = [c for c in channels if c not in [str(v) for v in img.coords["c"].values]]
        if missing:
            raise ConfigError(f"test image {test_image} has no channel(s) {', '.join(missing)}; pass an image with "
                              f"the model's input channels ({', '.join(channels)})")
        img = img.sel(c=list(channels)).isel({d: 0 for d in ("t", "z") if d in img.dims})
        # a centre crop to whole grid cells keeps the package small and the sizes valid for the network
        ny, nx = (min(size, img.sizes[d]) // grid * grid for d in ("y", "x"))
        if min(ny, nx) < min_size:
            raise ConfigError(f"test image {test_image} is {img.sizes['y']}x{img.sizes['x']} px; the package needs "
                              f"at least {min_size}x{min_size} (twice the halo plus one grid cell)")
        y0, x0 = (img.sizes["y"] - ny) // 2, (img.sizes["x"] - nx) // 2
        return img.isel(y=slice(y0, y0 + ny), x=slice(x0, x0 + nx)).load()
    from l2l_scale.synthetic import simulate

    sim = simulate(str((loaded.metadata.get("preset") or "actin")).replace("pxn", "adhesions"), size, seed=7)
    # the simulated input label stands in for every model input channel
    data = np.repeat(sim.isel(c=slice(0, 1)).values, len(channels), axis=0).astype(np.float32)
    import xarray as xr

    return xr.DataArray(data, dims=("c", "y", "x"), coords={"c": list(channels)},
                        attrs={"pixel_size": sim.attrs["pixel_size"]})


def _run_predict(model_dir: Path, img, channels: Sequence[str], percentiles, work: Path) -> np.ndarray:
    """l2l-scale's own predict on the test image: the reference output of the package."""
    from l2l_scale.io.read import open_image
    from l2l_scale.io.write import write_image
    from l2l_scale.predict import predict

    src = write_image(img.astype(np.float32), work / "test_input.zarr", chunks=_MIN_TEST_SIZE)
    out = predict(model_dir, src, work / "test_output.zarr", channels=list(channels), percentiles=percentiles)
    return np.asarray(open_image(out).values, dtype=np.float32)


def _cover(x: np.ndarray, y: np.ndarray, path: Path) -> None:
    """Input | restored side by side (2:1, the aspect ratio bioimage.io shows), each at its 1-99.8 percentiles."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    def _scaled(a):
        lo, hi = np.percentile(a, [1, 99.8])
        return np.clip((a - lo) / (hi - lo + 1e-20), 0, 1)

    plt.imsave(path, np.concatenate([_scaled(x), _scaled(y)], axis=1), cmap="magma")


def _export_onnx(keras_model, x: np.ndarray, expected: np.ndarray, path: Path) -> int:
    """Keras 3's ONNX export (tf2onnx), checked with onnxruntime; returns the opset."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise ModelError("onnx weights need onnx, onnxruntime and tf2onnx; install them with "
                         "pip install 'l2l-scale[bioimageio]', or pass --weight-formats keras_hdf5") from None
    keras_model.export(str(path), format="onnx", verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    err = float(np.max(np.abs(got - expected)))
    if not err <= ONNX_TOLERANCE:
        raise ModelError(f"the ONNX conversion differs from Keras by {err:.3g} (> {ONNX_TOLERANCE}); export "
                         "without onnx (--weight-formats keras_hdf5) and report the model")
    return int(max(op.version for op in onnx.load(str(path)).opset_import if op.domain in ("", "ai.onnx")))


def _export_saved_model(keras_model, n_in: int, path: Path) -> None:
    """A TF SavedModel zip whose ``serve`` endpoint returns ``{"output": y}`` (bioimageio.core reads a dict)."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(keras_model)
    archive.add_endpoint(name="serve", fn=lambda x: {"output": keras_model(x, training=False)},
                         input_signature=[tf.TensorSpec([None, None, None, n_in], tf.float32)])
    folder = path.with_suffix("")
    archive.write_out(str(folder), verbose=False)
    shutil.make_archive(str(folder), "zip", folder)
    shutil.rmtree(folder)


def export_bioimageio(model_dir: str | os.PathLike, output: str | os.PathLike, *, authors: Sequence[str],
                      license: str = "CC-BY-4.0", name: str | None = None, description: str | None = None,
                      test_image: str | os.PathLike | None = None, weights: str | None = None,
                      weight_formats: Sequence[str] = WEIGHT_FORMATS, overwrite: bool = False) -> Path:
    """Write a bioimage.io model package (format 0.5 zip) of a CSBDeep/l2l-scale model folder.

    Parameters
    ----------
    model_dir : path
        Model folder written by ``l2l-scale train``, or a CSBDeep CARE folder or ``export_TF`` zip (channel
        names then default to ``channel0, ...`` and the percentiles to CSBDeep's 2, 99.8).
    output : path
        The ``.zip`` to write.
    authors : sequence of str
        Names of the model's authors (at least one).
    license : str
        SPDX license identifier of the weights (default ``CC-BY-4.0``, bioimage.io's recommendation).
    name, description : str, optional
        Package name and one-paragraph description (defaults from the model's channels and training).
    test_image : path, optional
        OME-Zarr image with the model's input channels for the test tensors (centre-cropped); default a simulated
        field (:mod:`l2l_scale.synthetic`).
    weights : str, optional
        Weights file in the model folder (default ``weights_best.h5``).
    weight_formats : sequence of str
        Any of ``keras_hdf5`` (always written), ``onnx``, ``tensorflow_saved_model_bundle``.
    overwrite : bool
        Replace an existing zip.

    Returns
    -------
    Path
        The package.

    Raises
    ------
    ModelError
        The model cannot be exported (unsupported network, ONNX not within tolerance, missing extra).
    OutputError
        ``output`` exists without ``overwrite`` or is not a ``.zip``.
    ConfigError
        No author, an unknown weight format or a test image without the model's channels.
    """
    _require_bioimageio()
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as bm

    from l2l_scale import __version__
    from l2l_scale.model import load_model
    from l2l_scale.predict import DEFAULT_PERCENTILES, _output_names

    output = Path(output).expanduser()
    if output.suffix.lower() != ".zip":
        raise OutputError(f"bioimage.io output {output} must end in .zip; e.g. {output.with_suffix('.zip').name}")
    if output.exists() and not overwrite:
        raise OutputError(f"{output} exists; choose a new name or pass --overwrite")
    authors = [a.strip() for a in authors if a and a.strip()]
    if not authors:
        raise ConfigError("a bioimage.io package needs at least one author; pass --author 'First Last'")
    unknown = sorted(set(weight_formats) - set(WEIGHT_FORMATS))
    if unknown:
        raise ConfigError(f"unknown weight format(s) {', '.join(unknown)}; use {', '.join(WEIGHT_FORMATS)}")

    from l2l_scale.model.formats import resolve_model

    loaded = load_model(resolve_model(model_dir), weights)  # a CSBDeep export_TF zip re-exports too
    spec, meta = loaded.spec, loaded.metadata
    if spec.probabilistic:
        raise ModelError(f"{model_dir} is a probabilistic CARE model (mean and scale outputs); export-bioimageio "
                         "writes single-output models only, export a non-probabilistic one")
    in_names = list((meta.get("channels") or {}).get("input") or [f"channel{i}" for i in range(spec.n_channel_in)])
    out_names = _output_names(in_names, meta, spec)
    pct = [float(v) for v in ((meta.get("normalization") or {}).get("percentiles") or DEFAULT_PERCENTILES)]
    grid, halo = spec.grid, spec.halo
    size = max(_MIN_TEST_SIZE, -(-4 * halo // grid) * grid)
    min_size = grid * -(-(2 * halo + grid) // grid)  # smallest input whose output survives the halo crop

    work = Path(tempfile.mkdtemp(prefix=".l2l-bioimageio-", dir=output.parent if output.parent.exists() else None))
    try:
        img = _test_image(loaded, test_image, in_names, size, grid, min_size)
        y = _run_predict(loaded.path, img, in_names, pct, work)  # (c, y, x), normalised units
        raw = np.asarray(img.values, np.float32)
        x_test = np.moveaxis(raw, 0, -1)[None]  # batch, y, x, channel
        y_test = np.moveaxis(y, 0, -1)[None]
        np.save(work / "test_input.npy", x_test)
        np.save(work / "test_output.npy", y_test)
        import tifffile

        tifffile.imwrite(work / "sample_input.tif", raw[0])  # sample tensors: images for FAIR listings
        tifffile.imwrite(work / "sample_output.tif", y[0])
        _cover(raw[0], y[0], work / "cover.png")
        h5 = work / "model.h5"
        loaded.keras_model.save(str(h5))  # full model, legacy h5: what bioimageio.core's keras_hdf5 loads
        import tensorflow as tf

        tf_version = tf.__version__
        lo_hi = np.percentile(raw, pct, axis=(1, 2)).astype(np.float32)  # = scale_range on the test input
        x_norm = (x_test - lo_hi[0]) / (lo_hi[1] - lo_hi[0] + np.float32(1e-20))
        expected = loaded.predict_batch(x_norm)
        weights_kw: dict[str, Any] = {
            "keras_hdf5": bm.KerasHdf5WeightsDescr(source=h5, tensorflow_version=tf_version)}
        if "onnx" in weight_formats:
            opset = _export_onnx(loaded.keras_model, x_norm, expected, work / "model.onnx")
            weights_kw["onnx"] = bm.OnnxWeightsDescr(source=work / "model.onnx", opset_version=opset,
                                                     parent="keras_hdf5")
        if "tensorflow_saved_model_bundle" in weight_formats:
            _export_saved_model(loaded.keras_model, spec.n_channel_in, work / "tf_saved_model.zip")
            weights_kw["tensorflow_saved_model_bundle"] = bm.TensorflowSavedModelBundleWeightsDescr(
                source=work / "tf_saved_model.zip", tensorflow_version=tf_version, parent="keras_hdf5")

        in_id, out_id = bm.TensorId("input"), bm.TensorId("output")
        # no physical scale: bioimageio.spec checks halo * scale ratios in float and rejects e.g. 0.045 px sizes
        space_in = [bm.SpaceInputAxis(id=bm.AxisId(a), size=bm.ParameterizedSize(min=min_size, step=grid))
                    for a in ("y", "x")]
        space_out = [bm.SpaceOutputAxisWithHalo(id=ax.id, size=bm.SizeReference(tensor_id=in_id, axis_id=ax.id),
                                                halo=halo) for ax in space_in]
        scale_range = bm.ScaleRangeDescr(kwargs=bm.ScaleRangeKwargs(
            axes=[bm.AxisId("y"), bm.AxisId("x")], min_percentile=pct[0], max_percentile=pct[1], eps=1e-20))
        inputs = [bm.InputTensorDescr(
            id=in_id, description=f"raw {', '.join(in_names)} (any intensity scale; normalised by scale_range)",
            axes=[bm.BatchAxis(), *space_in, bm.ChannelAxis(channel_names=in_names)],
            test_tensor=bm.FileDescr(source=work / "test_input.npy"),
            sample_tensor=bm.FileDescr(source=work / "sample_input.tif"), preprocessing=[scale_range])]
        outputs = [bm.OutputTensorDescr(
            id=out_id, description="restored image in normalised units (input percentiles -> 0, 1)",
            axes=[bm.BatchAxis(), *space_out, bm.ChannelAxis(channel_names=out_names)],
            test_tensor=bm.FileDescr(source=work / "test_output.npy"),
            sample_tensor=bm.FileDescr(source=work / "sample_output.tif"))]
        loss = (meta.get("loss") or {}).get("name")
        training = (meta.get("provenance") or {}).get("training") or {}
        cfg_json = json.loads((loaded.path / "config.json").read_text())
        mode = meta.get("mode") or "label2label"
        doc = work / "README.md"
        doc.write_text(_documentation(in_names, out_names, pct, spec, meta, __version__), encoding="utf-8")
        descr = bm.ModelDescr(
            name=name or f"L2L CARE {'-'.join(in_names)} to {'-'.join(out_names)}"[:128],
            description=description or (f"Label2label ({mode}) CARE U-Net restoring {', '.join(in_names)}, trained "
                                        f"with l2l-scale {__version__}"),
            authors=[bm.Author(name=a) for a in authors],
            cite=[bm.CiteEntry(text=t, doi=bm.Doi(d)) for t, d in (L2L_CITATION, CARE_CITATION)],
            license=license,
            covers=[bm.FileDescr(source=work / "cover.png")],
            documentation=bm.FileDescr(source=doc),
            tags=["label2label", "care", "csbdeep", "denoising", "restoration", "fluorescence-light-microscopy",
                  "2d", "l2l-scale"],
            attachments=[bm.FileDescr(source=loaded.path / "config.json")]
            + ([bm.FileDescr(source=loaded.path / "l2l_scale.json")] if (loaded.path / "l2l_scale.json").is_file()
               else []),
            inputs=inputs, outputs=outputs,
            weights=bm.WeightsDescr(**weights_kw),
            config=bm.Config(
                bioimageio=bm.BioimageioConfig(
                    # tighter than the default 1e-3: the weights formats agree to ~1e-6 (onnx checked to 1e-4)
                    reproducibility_tolerance=[bm.ReproducibilityTolerance(
                        absolute_tolerance=ONNX_TOLERANCE, relative_tolerance=ONNX_TOLERANCE,
                        mismatched_elements_per_million=0)],
                    architecture_type="CARE U-Net", task="image restoration",
                    architecture_description=(f"CSBDeep CARE U-Net, depth {spec.unet_n_depth}, kernel "
                                              f"{spec.unet_kern_size}, {spec.unet_n_first} first filters, "
                                              f"residual {spec.unet_residual}; receptive field "
                                              f"{spec.receptive_field} px, halo {halo} px"),
                    training=bm.TrainingDetails(
                        loss_function=loss, training_epochs=training.get("epochs_trained"),
                        training_batch_size=training.get("global_batch"),
                        initial_learning_rate=cfg_json.get("train_learning_rate"), optimizer="Adam",
                        training_preprocessing=f"percentile normalisation {pct[0]:g}/{pct[1]:g}")),
                l2l_scale={"version": __version__, "csbdeep_config": cfg_json, "metadata": meta,
                           "receptive_field": spec.receptive_field, "halo": halo, "grid": grid,
                           "weights_sha256": loaded.checksum}),
        )
        tmp_zip = work / "package.zip"
        save_bioimageio_package(descr, output_path=tmp_zip)
        output.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_zip, output)
    except OSError as exc:
        raise OutputError(f"cannot write {output} ({exc}); check permissions and free space") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return output


def _documentation(in_names, out_names, pct, spec, meta, version) -> str:
    preset = meta.get("preset")
    return "\n".join([
        f"# Label2label CARE model: {', '.join(in_names)} -> {', '.join(out_names)}",
        "",
        "A CARE U-Net (CSBDeep) trained with the Label2label method (Kölln et al., J Cell Sci 2022): the",
        "lower-contrast label of a dual-label acquisition is the input, the higher-contrast label of the same",
        "structure the target, so the network keeps the structure and drops label-specific background.",
        "",
        f"- Exported by l2l-scale {version}" + (f", paper preset `{preset}`" if preset else "") + ".",
        f"- Input: {', '.join(in_names)}, normalised with the {pct[0]:g}/{pct[1]:g} percentiles of the whole image",
        "  (`scale_range`). l2l-scale computes them exactly over the whole image; bioimage.io tools over the",
        "  sample they are given, so pass whole images and tile with the halo below (bioimageio.core's blocked",
        "  prediction equals l2l-scale's except within one halo of the image border, which it pads",
        "  symmetrically).",
        "- Output: normalised units (input percentiles map to 0 and 1), not rescaled to the input range.",
        f"- Receptive field {spec.receptive_field} px; halo {spec.halo} px; sizes must be multiples of {spec.grid}.",
        "- Training provenance: `l2l_scale.json` and `config.json` (CSBDeep's) are attached; the folder of both",
        "  files plus the weights loads in CSBDeep as `CARE(None, name, basedir)`.",
        "",
        "## Validation",
        "",
        "The test output was written by `l2l-scale predict` (tiled, halo from the receptive field) for the test",
        f"input. The onnx weights were checked against Keras with onnxruntime to {ONNX_TOLERANCE:g}, and the package",
        f"reproduces the test output within {ONNX_TOLERANCE:g} (absolute and relative) with every weight format",
        "(`bioimageio test`). Training metrics are in `l2l_scale.json` (`provenance.training`); how well the",
        "model restores a given label pair is for its authors to document (e.g. with `l2l-scale evaluate`).",
        "",
    ])
