"""Model formats other than a CSBDeep folder: the one dispatch point :func:`resolve_model`.

``predict`` (and anything else that loads a model) passes its model path through :func:`resolve_model`, which
returns a CSBDeep/l2l-scale model folder:

- a model folder (``config.json``) is returned as it is;
- a **bioimage.io package** (zip or folder with ``rdf.yaml``/``bioimageio.yaml``) with ``keras_hdf5`` weights of
  a CARE U-Net: the network is taken from an attached ``config.json`` (packages written by
  ``l2l-scale export-bioimageio``) or derived from the h5 file's layer configuration (CSBDeep's layer names),
  the channel names from the channel axes and the percentiles from the ``scale_range`` preprocessing;
- a **TensorFlow SavedModel zip** as CSBDeep's ``export_TF`` writes it for the Fiji plugin (``saved_model.pb``,
  ``variables/``, ``meta.json``): the network is derived from the variables' shapes and the graph (residual
  addition, last activation, probabilistic scale branch), the weights are read from the checkpoint.

Nothing stored in a package is executed: the graph and the Keras configuration are parsed as data, and the
weights are copied into a freshly built network (:func:`l2l_scale.model.build_unet`). Because the architecture
is then known, tiling uses its exact receptive field (a package's own halo is recorded in the metadata). The
converted folder is cached under ``$L2L_SCALE_CACHE`` (default ``~/.cache/l2l-scale``) by the source's sha256,
written to a temporary name and renamed, so Dask workers load an ordinary folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any


from l2l_scale.errors import ModelError

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
_DOWN = re.compile(r"down_level_(\d+)_no_(\d+)$")
_CSBDEEP_NAMES = re.compile(r"(down_level_\d+_no_\d+|middle_\d+|up_level_\d+_no_\d+)$")


def cache_dir() -> Path:
    """Where converted models are kept: ``$L2L_SCALE_CACHE`` or ``~/.cache/l2l-scale``, plus ``models``."""
    return Path(os.environ.get("L2L_SCALE_CACHE") or Path.home() / ".cache" / "l2l-scale").expanduser() / "models"


def model_kind(path: str | os.PathLike) -> str:
    """``"folder"`` (CSBDeep/l2l-scale), ``"bioimageio"`` or ``"savedmodel"``; ``"unknown"`` otherwise."""
    p = Path(path).expanduser()
    if p.is_dir():
        if any((p / n).is_file() for n in RDF_NAMES):  # first: our packages also hold config.json
            return "bioimageio"
        if (p / "config.json").is_file():
            return "folder"
        if (p / "saved_model.pb").is_file():
            return "savedmodel"
        return "unknown"
    if p.is_file() and zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as zf:
            members = zf.namelist()
        if set(members) & set(RDF_NAMES):
            return "bioimageio"
        names = {Path(n).name for n in members}
        if "saved_model.pb" in names:
            return "savedmodel"
    return "unknown"


def resolve_model(path: str | os.PathLike) -> Path:
    """A CSBDeep/l2l-scale model folder for ``path`` (a folder, a bioimage.io package or a SavedModel zip).

    Parameters
    ----------
    path : str or path

    Returns
    -------
    Path
        ``path`` itself for a model folder (or anything unrecognised, so that the loader names the problem),
        else the cached converted folder.

    Raises
    ------
    ModelError
        A package that cannot be run here, with one line naming what is unsupported.
    """
    p = Path(path).expanduser()
    kind = model_kind(p)
    if kind in ("folder", "unknown"):
        return p
    from l2l_scale.model.loading import sha256_file

    digest = sha256_file(p) if p.is_file() else _folder_digest(p)
    target = cache_dir() / f"{kind}-{digest[:24]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        convert = _from_bioimageio if kind == "bioimageio" else _from_savedmodel
        convert(p, work / "src", work / "model", digest)
        try:
            os.replace(work / "model", target)
        except OSError:  # another process converted it meanwhile
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _folder_digest(folder: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.stat().st_size.to_bytes(8, "little"))
        h.update(str(f.stat().st_mtime_ns).encode())
    return h.hexdigest()


def _safe_extract(zip_path: Path, dest: Path) -> Path:
    """Extract a zip, refusing members that would land outside ``dest``."""
    dest.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as zf:
        for name in zf.namelist():
            target = (dest / name).resolve()
            if not str(target).startswith(str(dest.resolve()) + os.sep) and target != dest.resolve():
                raise ModelError(f"refusing {zip_path}: member {name!r} points outside the archive; re-create the zip")
        zf.extractall(dest)
    return dest


# ---------------------------------------------------------------------------------------------------- spec


def _spec_from_layers(convs: dict[str, tuple[int, ...]], head: str, *, residual: bool, last_activation: str,
                      probabilistic: bool, source: Path):
    """The ModelSpec of a CSBDeep U-Net from its conv layers' kernel shapes ``(kh, kw, c_in, c_out)``."""
    from l2l_scale.model.spec import ModelSpec, _layer_plan

    downs = [int(m.group(1)) for n in convs if (m := _DOWN.match(n))]
    if "down_level_0_no_0" not in convs:
        raise ModelError(f"{source} is not a CSBDeep CARE U-Net (no layer 'down_level_0_no_0'); l2l-scale runs "
                         "CARE U-Nets only")
    kh, kw, n_in, n_first = convs["down_level_0_no_0"]
    if kh != kw:
        raise ModelError(f"{source}: non-square kernels ({kh}x{kw}) are not supported; use a CARE U-Net with "
                         "square kernels")
    try:
        spec = ModelSpec(n_channel_in=int(n_in), n_channel_out=int(convs[head][3]), unet_n_depth=max(downs) + 1,
                         unet_kern_size=int(kh), unet_n_first=int(n_first), unet_last_activation=last_activation,
                         unet_residual=residual, probabilistic=probabilistic)
    except ModelError as exc:
        raise ModelError(f"{source}: {exc}") from None
    for op in _layer_plan(spec):
        if op[0] == "conv" and (op[1] not in convs or convs[op[1]][:2] != (op[3], op[3])
                                or convs[op[1]][3] != op[2]):
            raise ModelError(f"{source}: layer {op[1]!r} is missing or has another shape than a CSBDeep U-Net of "
                             f"depth {spec.unet_n_depth} (an unsupported variant of the architecture)")
    return spec


def _export(model, spec, out: Path, meta: dict) -> None:
    from l2l_scale.model.export import export_model

    export_model(model, spec, out, metadata=meta)


# ----------------------------------------------------------------------------------------- bioimage.io


def _from_bioimageio(src: Path, work: Path, out: Path, digest: str) -> None:
    try:
        from bioimageio.spec import load_model_description
        from bioimageio.spec.model import v0_4, v0_5
    except ImportError:
        raise ModelError(f"{src} is a bioimage.io package; reading it needs bioimageio.spec: "
                         "pip install 'l2l-scale[bioimageio]'") from None
    folder = _safe_extract(src, work) if src.is_file() else src
    rdf = next(folder / n for n in RDF_NAMES if (folder / n).is_file())
    try:
        descr = load_model_description(rdf, perform_io_checks=False)
    except ValueError as exc:  # bioimageio.spec raises for invalid descriptions
        reason = "; ".join(line.strip(" -") for line in str(exc).splitlines()[1:4] if line.strip())
        raise ModelError(f"{src} is not a valid bioimage.io model package ({reason or exc}); check it with "
                         "'bioimageio validate'") from None
    if not isinstance(descr, (v0_4.ModelDescr, v0_5.ModelDescr)):
        raise ModelError(f"{src} describes a bioimage.io {getattr(descr, 'type', '?')}, not a model; pass a model "
                         "package")
    present = [k for k, v in descr.weights.model_dump().items() if v]
    if descr.weights.keras_hdf5 is None:
        raise ModelError(f"{src}: unsupported weights ({', '.join(present)}); l2l-scale runs bioimage.io packages "
                         "with keras_hdf5 weights of a CARE U-Net")
    if len(descr.inputs) != 1 or len(descr.outputs) != 1:
        raise ModelError(f"{src}: {len(descr.inputs)} inputs and {len(descr.outputs)} outputs are not supported; "
                         "l2l-scale runs single-input, single-output CARE U-Nets")
    h5 = _local_file(folder, descr.weights.keras_hdf5.source, src)
    attached = [_local_file(folder, a.source, src) for a in descr.attachments] if isinstance(descr, v0_5.ModelDescr) \
        else []
    config = next((a for a in attached if a.name == "config.json"), None)
    from l2l_scale.model.build import build_unet
    from l2l_scale.model.safety import _check_h5
    from l2l_scale.model.spec import read_spec

    _check_h5(h5)  # refuses Lambda layers and custom objects before anything is built
    if config is not None:
        cfg_dir = work.parent / "cfg"
        cfg_dir.mkdir(exist_ok=True)
        shutil.copy(config, cfg_dir / "config.json")
        spec = read_spec(cfg_dir)
    else:
        spec = _spec_from_keras_config(h5)
    model = build_unet(spec)
    try:
        model.load_weights(str(h5))
    except (ValueError, KeyError, OSError, TypeError) as exc:
        raise ModelError(f"{src}: the keras_hdf5 weights do not fit the CARE U-Net they describe ({exc}); "
                         "re-export the package") from exc
    meta = _bioimageio_metadata(descr, src, digest, spec)
    _export(model, spec, out, meta)


def _local_file(folder: Path, source: Any, src: Path) -> Path:
    """A package file as a local path; sources given as URLs are refused (nothing is downloaded)."""
    text = str(source)
    if "://" in text:
        raise ModelError(f"{src}: {text} is a URL; l2l-scale downloads nothing, put the file into the package")
    path = folder / text
    if not path.is_file():
        raise ModelError(f"{src}: the package lists {text} but does not hold it; re-create the package")
    return path


def _spec_from_keras_config(h5: Path):
    import h5py

    with h5py.File(h5, "r") as f:
        raw = f.attrs.get("model_config")
    if raw is None:
        raise ModelError(f"{h5} holds weights only (no layer configuration) and the package attaches no "
                         "config.json; l2l-scale cannot tell the architecture")
    layers = json.loads(raw.decode() if isinstance(raw, bytes) else raw)["config"]["layers"]
    convs, one_by_one, softplus, residual, last = {}, [], None, False, "linear"
    n_in = None
    for layer in layers:
        cls, cfg, name = layer["class_name"], layer["config"], layer["config"]["name"]
        if cls == "InputLayer":
            n_in = (cfg.get("batch_shape") or cfg.get("batch_input_shape"))[-1]
        elif cls == "Conv2D":
            k = tuple(cfg["kernel_size"])
            convs[name] = (*k, None, cfg["filters"])
            if k == (1, 1) and not _CSBDEEP_NAMES.match(name):
                one_by_one.append(name)
                if cfg.get("activation") == "softplus":
                    softplus = name
        elif cls == "Add":
            residual = True
        elif cls == "Activation":
            last = cfg.get("activation", "linear")
    heads = [n for n in one_by_one if n != softplus]
    if len(heads) != 1:
        raise ModelError(f"{h5}: expected one 1x1 output convolution, found {len(heads)}; not a CARE U-Net")
    if "down_level_0_no_0" in convs:
        k = convs["down_level_0_no_0"]
        convs["down_level_0_no_0"] = (k[0], k[1], n_in, k[3])
    return _spec_from_layers(convs, heads[0], residual=residual, last_activation=last,
                             probabilistic=softplus is not None, source=h5)


def _op(proc) -> str:
    """A processing step's name: ``id`` in format 0.5, ``name`` in 0.4."""
    return str(getattr(proc, "id", None) or getattr(proc, "name", "?"))


def _bioimageio_metadata(descr, src: Path, digest: str, spec) -> dict:
    from bioimageio.spec.model import v0_5

    meta: dict[str, Any] = {"imported_from": {"format": "bioimage.io", "source": str(src), "sha256": digest,
                                              "name": descr.name}}
    inp, out = descr.inputs[0], descr.outputs[0]
    pre = [p for p in (inp.preprocessing or []) if _op(p) != "ensure_dtype"]
    if isinstance(descr, v0_5.ModelDescr):
        names = {}
        for key, tensor in (("input", inp), ("output", out)):
            ch = [a for a in tensor.axes if a.type == "channel"]
            if ch and len(ch[0].channel_names) == (spec.n_channel_in if key == "input" else spec.n_channel_out):
                names[key] = [str(c) for c in ch[0].channel_names]
        if names.get("input"):
            meta["channels"] = names
        halos = [a.halo for a in out.axes if getattr(a, "halo", None)]
        if halos:
            meta["imported_from"]["halo"] = int(max(halos))
    if pre:
        if _op(pre[0]) != "scale_range" or len(pre) > 1:
            raise ModelError(f"{src}: unsupported preprocessing {', '.join(map(_op, pre))}; l2l-scale "
                             "normalises with percentiles (scale_range)")
        kw = pre[0].kwargs
        meta["normalization"] = {"percentiles": [float(kw.min_percentile), float(kw.max_percentile)]}
    post = [_op(p) for p in (out.postprocessing or []) if _op(p) != "ensure_dtype"]
    if post:
        raise ModelError(f"{src}: unsupported postprocessing {', '.join(post)}; l2l-scale writes the network "
                         "output in normalised units")
    return meta


# --------------------------------------------------------------------------- CSBDeep export_TF SavedModel


def _from_savedmodel(src: Path, work: Path, out: Path, digest: str) -> None:
    folder = _safe_extract(src, work) if src.is_file() else src
    pb = next(iter(sorted(folder.rglob("saved_model.pb"))), None)
    root = pb.parent
    meta_file = next((p for p in (root / "meta.json", folder / "meta.json") if p.is_file()), None)
    meta_tf = json.loads(meta_file.read_text()) if meta_file else {}
    kind = meta_tf.get("type", "CARE")
    if kind not in ("CARE", "UpsamplingCARE"):
        raise ModelError(f"{src}: a CSBDeep {kind} model is not supported; l2l-scale runs CARE models")
    if kind == "UpsamplingCARE" or "Z" in str(meta_tf.get("axes", "YXC")).upper():
        raise ModelError(f"{src}: 3D/upsampling CARE models (axes {meta_tf.get('axes')}) are not supported; use a "
                         "2D CARE model (axes YXC)")
    graph, in_name, out_name = _read_graph(pb, src)
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(root / "variables" / "variables"))
    shapes = reader.get_variable_to_shape_map()
    convs = {k[: -len("/kernel")]: tuple(v) for k, v in shapes.items() if k.endswith("/kernel") and len(v) == 4}
    by_name = {n.name: n for n in graph}
    softplus = {n.name.split("/")[0] for n in graph if n.op == "Softplus"}
    heads = [n for n, s in convs.items() if s[:2] == (1, 1) and not _CSBDEEP_NAMES.match(n) and n not in softplus]
    if len(heads) != 1:
        raise ModelError(f"{src}: expected one 1x1 output convolution, found {len(heads)}; not a CARE U-Net")
    residual = any(n.op in ("Add", "AddV2") and in_name in [i.split(":")[0].lstrip("^") for i in n.input]
                   for n in graph)
    node = by_name.get(out_name)
    while node is not None and node.op in ("Identity", "ConcatV2"):
        node = by_name.get(node.input[0].split(":")[0])
    last = "relu" if node is not None and node.op == "Relu" else "linear"
    probabilistic = bool(meta_tf.get("probabilistic", bool(softplus)))
    if probabilistic and len(softplus) != 1:
        raise ModelError(f"{src}: a probabilistic CARE model needs one softplus scale convolution, found "
                         f"{len(softplus)}; not a CSBDeep CARE graph")
    spec = _spec_from_layers(convs, heads[0], residual=residual, last_activation=last,
                             probabilistic=probabilistic, source=src)
    from l2l_scale.model.build import build_unet
    from l2l_scale.model.spec import _layer_plan

    model = build_unet(spec)
    names = {}
    for op in _layer_plan(spec):
        if op[0] == "conv":
            names[op[1]] = op[1]
        elif op[0] == "head":
            names[op[1]] = heads[0]
        elif op[0] == "prob_scale":
            (scale,) = softplus
            names[op[1]] = scale
    for layer in model.layers:
        if layer.name in names:
            var = names[layer.name]
            layer.set_weights([reader.get_tensor(f"{var}/kernel"), reader.get_tensor(f"{var}/bias")])
    overlap = meta_tf.get("tile_overlap")
    meta = {"imported_from": {"format": "CSBDeep export_TF SavedModel", "source": str(src), "sha256": digest,
                              "meta": meta_tf},
            "normalization": {"percentiles": [2.0, 99.8]}}  # CSBDeep's PercentileNormalizer defaults
    if overlap:
        meta["imported_from"]["tile_overlap"] = overlap
    _export(model, spec, out, meta)


def _read_graph(pb: Path, src: Path):
    """The graph nodes and the serving signature's input/output node names, parsed as protobuf data."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    try:
        sm.ParseFromString(pb.read_bytes())
    except Exception as exc:  # protobuf's DecodeError has no stable import path
        raise ModelError(f"{src}: saved_model.pb is not a SavedModel ({exc}); re-export it with CSBDeep") from exc
    for mg in sm.meta_graphs:
        sig = mg.signature_def.get("serving_default")
        if sig is not None and "input" in sig.inputs and "output" in sig.outputs:
            return (list(mg.graph_def.node), sig.inputs["input"].name.split(":")[0],
                    sig.outputs["output"].name.split(":")[0])
    raise ModelError(f"{src}: no serving signature with 'input' and 'output' (as CSBDeep's export_TF writes); "
                     "re-export the model with CARE.export_TF")
