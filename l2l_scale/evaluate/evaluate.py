"""The evaluate step: compare restorations of one input against the target label (and the ground truth).

``l2l-scale evaluate`` takes the target label, optionally the raw input and a ground truth, and any number of
restorations of that input (L2L with different losses, N2N, the classical baselines, ...). It writes, into one
results folder::

    OUT_DIR/
      evaluation.json      what was compared (paths, channels, normalisation values, provenance), the parameters,
                           the metric rows, the patch positions, the difference maps and the model folders:
                           the one file ``l2l-scale report`` reads
      metrics.csv          the same metric rows as a table (see "Metric rows")
      maps/<method>.zarr   difference maps of each restoration as an NGFF 0.5 image with channels
                           ``rms`` and ``ssim`` and ``l2l_scale`` provenance

Image specs
-----------
An image is named ``PATH[:CHANNEL]`` (an OME-Zarr image or plate field, and a channel name or index) and reduced to
one 2-D ``(y, x)`` plane; all must have the target's shape and pixel size (see :mod:`l2l_scale.evaluate.images`).

Normalisation
-------------
``normalize="percentile"`` (the default, as in the paper): every image (input, restorations, target, truth) is
mapped with its own exact low/high percentiles over the *whole* image (:func:`l2l_scale.preprocess.normalize.
percentiles`, never per tile; default 1 / 99.9 as for the paper's actin data) to 0 / 1, without clipping
(CSBDeep's ``normalize``), and the metrics use ``data_range=1``. This makes a float restoration in normalised
units, a raw uint16 input and a baseline in raw units comparable. The values used are stored in
``evaluation.json``. ``normalize="none"`` compares the stored values as they are: the images must then have
matching types (a float restoration against a uint16 target raises the metrics module's
:class:`~l2l_scale.errors.InputError`), and the data range comes from the target (see
:func:`l2l_scale.evaluate.metrics.resolve_data_range`) unless ``data_range`` is given. ``smooth`` applies a
Gaussian filter after normalising (the paper uses sigma 1.5 for the STED caveolae).

Metric rows
-----------
One row per image (the raw ``input``, every restoration in the order given, and the ``target`` label itself),
per reference (``target``, and ``truth`` when given) and per region:

* ``region="patches"``: the paper's Table 1 protocol, means over ``patches`` foreground patches of
  ``patch_size``^2 px sampled with :func:`~l2l_scale.evaluate.metrics.foreground_patches` (CSBDeep's
  non-background rule on the raw target label, fixed ``seed``). The same positions are used for every image
  and both references, so all rows see the same pixels.
* ``region="image"``: the whole image, as Dask reductions that never load an image whole.

Columns: ``psnr``, ``nrmse`` (min-max), ``ms_ssim_5``, ``ms_ssim_3``, ``ms_ssim_1`` (the paper's presets),
``pcc``, ``tolerance_level`` (VirFluoNet) and the Michelson and RMS contrast (``michelson``, ``rms``; the
paper's recipe, a property of the image alone, so equal for both references). These are the *raw* metrics. The
``*_fit`` columns (``psnr_fit``, ``nrmse_fit``, ``ms_ssim_5_fit``, ``ms_ssim_3_fit``, ``ms_ssim_1_fit``) are the
same metrics after the least-squares affine fit of the image to the reference (CARE's ``normalize_minmse``, see
:mod:`l2l_scale.evaluate.scale`): scale-invariant, like PCC. Comparisons that do not exist
(the target against itself) are empty in the CSV and ``null`` in the JSON; non-finite values are written as
``inf``/``nan`` in the CSV and ``null`` in the JSON (e.g. the PSNR of identical images).

Difference maps
---------------
For each restoration, against the input (or against the target when no input is given), on the normalised
images: the local RMS difference ``sqrt(G_sigma * (a - b)^2)`` (Fig. 1D of the paper; ``rms_sigma``, default
2 px) and the local SSIM map (Gaussian window sigma 1.5, the map whose mean is skimage's SSIM). Both are Dask
``map_overlap`` graphs whose halo is the filter radius (``int(truncate * sigma + 0.5)``, SciPy's), with
reflecting borders, so the tiled maps equal the whole-image filters.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import dask.array as da
import numpy as np
import xarray as xr

from l2l_scale.errors import ConfigError, InputError
from l2l_scale.evaluate.images import (
    ImageSpec,
    _check_compatible,
    _check_name,
    _Image,
    _pixel_size,
    load_image,
    parse_method,
)
from l2l_scale.evaluate.maps import _radius, rms_map, ssim_map
from l2l_scale.io.output import atomic_output, check_output
from l2l_scale.io.prov import provenance
from l2l_scale.io.write import write_image

__all__ = [
    "CSV_COLUMNS",
    "EVALUATION_FILE",
    "EVALUATION_VERSION",
    "FIT_COLUMNS",
    "METRIC_COLUMNS",
    "METRICS_FILE",
    "evaluate",
    "format_table",
]

EVALUATION_FILE = "evaluation.json"
METRICS_FILE = "metrics.csv"
MAPS_DIR = "maps"
EVALUATION_VERSION = 1
NORMALIZE_MODES = ("percentile", "none")
#: The scale-dependent metrics (Table 1's) again after the affine fit to the reference
#: (:mod:`l2l_scale.evaluate.scale`).
FIT_COLUMNS = tuple(f"{m}_fit" for m in ("psnr", "nrmse", "ms_ssim_5", "ms_ssim_3", "ms_ssim_1"))
METRIC_COLUMNS = ("psnr", "nrmse", "ms_ssim_5", "ms_ssim_3", "ms_ssim_1", "pcc", "tolerance_level", "michelson",
                  "rms") + FIT_COLUMNS
CSV_COLUMNS = ("method", "role", "reference", "region", "n_patches") + METRIC_COLUMNS
_COMPARISON = METRIC_COLUMNS[:7] + FIT_COLUMNS



def _whole_image_metrics(pairs: Sequence[tuple[da.Array, da.Array, float]]) -> list[dict[str, float]]:
    """Table 1 metrics and PCC of every (reference, image, data range) pair in one Dask compute.

    The metrics module's public functions compute one metric (or one pair) per call; building their plans
    here lets one pass over the data serve every pair (each source chunk is read once). The tolerance level is
    a separate pass per pair (its public function).
    """
    from l2l_scale.evaluate.blockwise import _run
    from l2l_scale.evaluate.metrics import TABLE1_KEYS, _table1_plans
    from l2l_scale.evaluate.pixel import _pcc_plan, tolerance_level

    plans = []
    for t, p, r in pairs:
        plans += _table1_plans(t, p, r) + [_pcc_plan(t, p, None)]
    values = _run(plans) if plans else []
    out = []
    for i, (t, p, r) in enumerate(pairs):
        v = values[6 * i: 6 * i + 6]
        row = dict(zip(TABLE1_KEYS + ("pcc",), (float(x) for x in v)))
        row["tolerance_level"] = float(tolerance_level(t, p, data_range=r).value)
        out.append(row)
    return out


def _fitted_image_metrics(pairs: Sequence[tuple[da.Array, da.Array, float]],
                          coefs: Sequence[tuple[float, float]]) -> list[dict[str, float]]:
    """PSNR, NRMSE and MS-SSIM (M=5, 3, 1) of every pair after the affine fit ``alpha * image + beta``."""
    from l2l_scale.evaluate.blockwise import _run
    from l2l_scale.evaluate.metrics import _table1_plans

    plans = []
    for (t, p, r), (alpha, beta) in zip(pairs, coefs):
        plans += _table1_plans(t, (p.astype(np.float64) * alpha + beta).astype(np.float32), r)
    values = _run(plans) if plans else []
    return [dict(zip(FIT_COLUMNS, (float(x) for x in values[5 * i: 5 * i + 5]))) for i in range(len(pairs))]


def _patch_metrics(t: np.ndarray, p: np.ndarray, r: float, coef: tuple[float, float]) -> dict[str, float]:
    """Means over a patch set, as the paper's Table 1 reports them."""
    from l2l_scale.evaluate.metrics import pcc, table1_metrics, tolerance_level

    row = table1_metrics(t, p, data_range=r)
    with np.errstate(all="ignore"):
        pc = np.asarray(pcc(t, p))
        row["pcc"] = float(np.nanmean(pc)) if np.isfinite(pc).any() else float("nan")
    row["tolerance_level"] = float(np.mean(tolerance_level(t, p, data_range=r).value))
    fitted = table1_metrics(t, (p.astype(np.float64) * coef[0] + coef[1]).astype(np.float32), data_range=r)
    row.update({f"{k}_fit": v for k, v in fitted.items()})
    return {k: float(v) for k, v in row.items()}


def _normalise(images: Sequence[_Image], mode: str, q: tuple[float, float], smooth: float) -> None:
    """Set ``norm`` (and ``lo``/``hi``) of every image: exact whole-image percentiles, one pass per image."""
    from l2l_scale.preprocess.normalize import normalize, percentiles

    for im in images:
        x = im.data.data
        if mode == "percentile":
            try:
                lo, hi = (float(v) for v in percentiles(x, list(q), channel_axis=None))
                im.norm = normalize(x, lo, hi, dtype=np.float32, channel_axis=None)
            except InputError as exc:
                raise InputError(f"{im.label} {im.spec}: {exc}") from None
            im.lo, im.hi = lo, hi
        else:
            im.norm = x
        if smooth:
            from dask_image.ndfilters import gaussian_filter

            src = im.norm if im.norm.dtype.kind == "f" else im.norm.astype(np.float32)
            im.norm = gaussian_filter(src.astype(np.float64), smooth, mode="reflect").astype(src.dtype)


def _data_range(target: da.Array, mode: str, data_range: float | None) -> float:
    from l2l_scale.evaluate.metrics import resolve_data_range

    if data_range is not None:
        return resolve_data_range(target, data_range)
    return 1.0 if mode == "percentile" else resolve_data_range(target, None)


def _empty_row(name: str, role: str, reference: str, region: str, n: int | None) -> dict:
    row: dict[str, Any] = {"method": name, "role": role, "reference": reference, "region": region,
                           "n_patches": n}
    row.update({k: None for k in METRIC_COLUMNS})
    return row


# -------------------------------------------------------------------------------------------------- writing


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    return v


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    return str(v)


def _write_csv(rows: Sequence[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for row in rows:
            w.writerow([_csv_value(row.get(k)) for k in CSV_COLUMNS])


def _model_folders(methods: Sequence[_Image], models: Mapping[str, Any] | Iterable | None) -> dict[str, dict]:
    """Model folders for the report's loss curves: named explicitly, or found in a prediction's provenance."""
    found: dict[str, dict] = {}
    for im in methods:
        path = ((im.provenance or {}).get("model") or {}).get("path")
        if path and Path(path).is_dir():
            found[im.name] = {"path": str(Path(path).resolve()), "source": "provenance"}
    if models is None:
        return found
    items = models.items() if isinstance(models, Mapping) else ((Path(p).name, p) for p in models)
    for name, path in items:
        path = Path(path)
        if not path.is_dir():
            raise InputError(f"model folder {path} does not exist; pass the folder written by 'l2l-scale train'")
        found[str(name)] = {"path": str(path.resolve()), "source": "option"}
    return found


# ------------------------------------------------------------------------------------------------- evaluate


def evaluate(target: Any, restorations: Mapping[str, Any] | Sequence[Any], output_dir: str | Path, *,
             input: Any = None, truth: Any = None, normalize: str = "percentile",
             percentiles: Sequence[float] = (1.0, 99.9), patches: int = 64, patch_size: int = 128, seed: int = 0,
             threshold: float = 0.4, data_range: float | None = None, smooth: float = 0.0,
             rms_sigma: float = 2.0, contrast_top_fraction: float = 0.1,
             contrast_percentiles: Sequence[float] = (1.0, 99.0), models: Mapping[str, Any] | Sequence | None = None,
             crossval: str | Path | None = None, chunks: int | None = None, overwrite: bool = False,
             command: str | None = None) -> Path:
    """Compare restorations of one input against the target label (and the ground truth) and write the results.

    Parameters
    ----------
    target : str, Path, ImageSpec or (path, channel)
        The target label, ``PATH[:CHANNEL]`` (see the module notes).
    command : str, optional
        The command line for the output's provenance (default: this process's; the CLI passes its own).
    restorations : mapping or sequence
        ``{name: spec}``, or specs / ``"NAME=SPEC"`` strings (a bare spec is named after its file). May be empty
        (then only the input is compared).
    output_dir : str or Path
        The results folder (must not exist unless ``overwrite``); written atomically.
    input : spec, optional
        The raw input label (an ``input`` row, and the reference of the difference maps).
    truth : spec, optional
        The ground truth (simulations): every image is also compared against it.
    normalize : {'percentile', 'none'}
        Normalise every image with its own exact whole-image ``percentiles`` (default), or compare raw values.
    percentiles : (float, float)
        Low/high percentiles mapped to 0/1 (paper: 1, 99.9 for actin, tubulin, PXN; 2, 99.5 for caveolae).
    patches, patch_size, seed, threshold : int, int, int, float
        Foreground validation patches: how many, their side, the sampling seed and CSBDeep's background
        threshold (x the target's 99.9th percentile).
    data_range : float, optional
        Overrides the metrics' data range (default 1 with normalisation, else from the target's dtype).
    smooth : float
        Gaussian sigma applied to every normalised image before comparing (paper: 1.5 for STED caveolae; 0 = off).
    rms_sigma : float
        Gaussian sigma in px of the local RMS difference map.
    contrast_top_fraction, contrast_percentiles : float, (float, float)
        The contrast recipe's sample fraction and normalisation (paper: 0.1 and 1/99; 0.01 and 2/99.5 for
        caveolae).
    models : mapping or sequence of paths, optional
        Model folders whose training curves the report shows (``{name: folder}``); folders named in a prediction's
        provenance are found automatically.
    crossval : str or Path, optional
        A ``crossval.json`` to show in the report (see :mod:`l2l_scale.evaluate.report`).
    chunks : int, optional
        Chunk side of the difference maps (default 1024).
    overwrite : bool
        Replace an existing results folder.

    Returns
    -------
    Path
        ``output_dir``, holding ``evaluation.json``, ``metrics.csv`` and ``maps/``.

    Raises
    ------
    InputError
        Images of different shapes or pixel sizes (both named), unreadable images, mismatched types with
        ``normalize='none'``, a constant image, or no foreground patch.
    ChannelError
        A missing or ambiguous channel.
    ConfigError
        Bad options, method names or patch sizes.
    OutputError
        The results folder exists (without ``overwrite``) or overlaps an input.
    """
    from l2l_scale.evaluate.metrics import contrast, foreground_patches
    from l2l_scale.evaluate.sampling import cut_patches
    from l2l_scale.evaluate.scale import affine_coefficients_many
    from l2l_scale.preprocess.contrast import image_contrast
    from l2l_scale.preprocess.normalize import parse_percentiles

    mode = str(normalize).lower()
    if mode not in NORMALIZE_MODES:
        raise ConfigError(f"normalize={normalize!r} must be one of {NORMALIZE_MODES}; use 'percentile' (the paper)")
    q = parse_percentiles(percentiles)
    cq = parse_percentiles(contrast_percentiles)
    n_patches, psize = int(patches), int(patch_size)
    if n_patches < 0:
        raise ConfigError(f"patches={patches} must be >= 0 (0 skips the patch metrics)")
    if not (np.isfinite(smooth) and smooth >= 0):
        raise ConfigError(f"smooth={smooth} must be >= 0 (paper: 1.5 for STED caveolae, else 0)")

    methods: list[tuple[str, ImageSpec]] = []
    items = restorations.items() if isinstance(restorations, Mapping) else None
    if items is not None:
        for name, spec in items:
            _check_name(str(name))
            methods.append((str(name), ImageSpec.parse(spec)))
    else:
        for spec in restorations or ():
            methods.append(parse_method(spec) if isinstance(spec, str) else parse_method(str(ImageSpec.parse(spec))))
    names = [n for n, _ in methods]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"method name(s) {dup} given twice; name every restoration differently (NAME=PATH)")
    if input is None and not methods:
        raise ConfigError("nothing to compare with the target; pass --method NAME=PATH[:CHANNEL] and/or --input")

    # Open and validate everything before the first pass over the data.
    def _load(name: str, role: str, spec: Any) -> _Image:
        spec = ImageSpec.parse(spec)
        what = f"the {role}" if role != "method" else f"method {name!r}"
        data, channel = load_image(spec, what=what)
        prov = data.attrs.get("l2l_scale")
        extra = {"stored_dtype": data.attrs.get("stored_dtype", str(data.dtype))}
        return _Image(name, role, spec, data, channel, provenance=prov, extra=extra)

    tgt = _load("target", "target", target)
    inp = _load("input", "input", input) if input is not None else None
    rest = [_load(n, "method", s) for n, s in methods]
    tru = _load("truth", "truth", truth) if truth is not None else None
    rows_images = ([inp] if inp else []) + rest + [tgt]
    everything = [tgt] + ([inp] if inp else []) + rest + ([tru] if tru else [])
    _check_compatible(everything)
    ny, nx = (int(n) for n in tgt.data.shape)
    if n_patches and not (0 < psize <= min(ny, nx)):
        raise ConfigError(f"patch_size={patch_size} must be positive and fit the {ny}x{nx} image; use e.g. "
                          f"--patch-size {min(128, ny, nx)}")
    model_dirs = _model_folders(rest, models)
    if crossval is not None and not Path(crossval).is_file():
        raise InputError(f"crossval file {crossval} does not exist; pass the crossval.json written by "
                         "'l2l-scale crossval'")
    output_dir = Path(output_dir)
    inputs = sorted({str(im.spec.path) for im in everything})
    check_output(output_dir, overwrite=overwrite, inputs=inputs)

    _normalise(everything, mode, q, float(smooth))
    references = [tgt] + ([tru] if tru else [])
    ranges = {ref.name: _data_range(ref.norm, mode, data_range) for ref in references}

    # Whole images: one compute for every pair's Table 1 metrics and PCC.
    pairs, keys = [], []
    for ref in references:
        for im in rows_images:
            if im is ref:
                continue
            pairs.append((ref.norm, im.norm, ranges[ref.name]))
            keys.append((ref.name, im.name))
    whole = dict(zip(keys, _whole_image_metrics(pairs)))
    # One affine fit per (reference, image), over the whole image; the patch rows reuse it (never a fit per patch).
    coefs = affine_coefficients_many([(t, p) for t, p, _ in pairs])
    for key, fitted in zip(keys, _fitted_image_metrics(pairs, coefs)):
        whole[key].update(fitted)
    fits = dict(zip(keys, coefs))
    contrast_kw = dict(top_fraction=float(contrast_top_fraction), percentiles=cq)
    image_contrasts = {im.name: image_contrast(im.norm, label=f"{im.label} {im.spec}", **contrast_kw)
                       for im in rows_images}

    # Foreground patches: positions from the raw target label (CSBDeep samples raw images), shared by all rows.
    corners = np.zeros((0, 2), dtype=np.int64)
    patch_rows: dict[tuple[str, str], dict] = {}
    patch_contrasts: dict[str, tuple[float, float]] = {}
    if n_patches:
        raw_t = tgt.data.data
        corners = foreground_patches(raw_t, raw_t, patch_size=psize, n=n_patches, threshold=threshold,
                                     seed=seed).corners
        cut = dict(zip([im.name for im in everything], cut_patches([im.norm for im in everything], corners, psize)))
        for (ref_name, name) in keys:
            patch_rows[(ref_name, name)] = _patch_metrics(cut[ref_name], cut[name], ranges[ref_name],
                                                          fits[(ref_name, name)])
        for im in rows_images:
            with np.errstate(all="ignore"):
                mi, rm = contrast(cut[im.name], **contrast_kw)
            patch_contrasts[im.name] = (float(np.nanmean(mi)), float(np.nanmean(rm)))

    rows: list[dict] = []
    for region in (["patches"] if n_patches else []) + ["image"]:
        for ref in references:
            for im in rows_images:
                row = _empty_row(im.name, im.role, ref.name, region, n_patches if region == "patches" else None)
                values = (patch_rows if region == "patches" else whole).get((ref.name, im.name))
                if values:
                    row.update({k: values[k] for k in _COMPARISON})
                mi, rm = (patch_contrasts if region == "patches" else image_contrasts)[im.name]
                row["michelson"], row["rms"] = float(mi), float(rm)
                rows.append(row)

    map_ref = inp or tgt
    parameters = {
        "normalize": mode, "percentiles": list(q), "data_range": {k: float(v) for k, v in ranges.items()},
        "smooth": float(smooth),
        "affine_fit": {"columns": list(FIT_COLUMNS),
                       "rule": "alpha * image + beta, least squares against the reference over the whole image "
                               "(csbdeep.utils.normalize_minmse); the patch rows use the whole-image fit",
                       "coefficients": [{"reference": k[0], "method": k[1], "alpha": c[0], "beta": c[1]}
                                        for k, c in fits.items()]},
        "patches": {"n": n_patches, "size": psize, "seed": int(seed), "threshold": float(threshold),
                    "selected_on": "target (raw)"},
        "contrast": {"sigma": 2.0, "percentiles": list(cq), "top_fraction": float(contrast_top_fraction)},
        "maps": {"reference": map_ref.role, "rms": {"sigma": float(rms_sigma), "truncate": 4.0,
                                                    "halo": _radius(rms_sigma, 4.0)},
                 "ssim": {"sigma": 1.5, "truncate": 3.5, "halo": _radius(1.5, 3.5), "k1": 0.01, "k2": 0.03}},
    }
    prov = provenance(parameters, [str(im.spec) for im in everything], command=command)
    maps: dict[str, dict] = {}
    with atomic_output(output_dir, overwrite=overwrite, inputs=inputs) as tmp:
        if rest:
            (tmp / MAPS_DIR).mkdir()
        for im in rest:
            r = ranges[tgt.name]
            layers = da.stack([rms_map(map_ref.norm, im.norm, sigma=rms_sigma),
                               ssim_map(map_ref.norm, im.norm, data_range=r)])
            arr = xr.DataArray(layers, dims=("c", "y", "x"),
                               coords={"c": ["rms", "ssim"], "y": tgt.data.coords["y"].values,
                                       "x": tgt.data.coords["x"].values})
            rel = f"{MAPS_DIR}/{im.name}.zarr"
            map_prov = provenance(parameters["maps"], [str(map_ref.spec), str(im.spec)], command=command,
                                  maps={"reference": map_ref.name, "method": im.name,
                                        "channels": {"rms": "local RMS difference, normalised units",
                                                     "ssim": "local SSIM"},
                                        "normalize": mode, "percentiles": list(q)})
            write_image(arr, tmp / rel, pixel_size={"y": _pixel_size(tgt.data)[0], "x": _pixel_size(tgt.data)[1]},
                        chunks=chunks, provenance=map_prov, name=f"{im.name}-maps",
                        label=f"difference maps {im.name}")
            maps[im.name] = {"path": rel, "channels": ["rms", "ssim"], "reference": map_ref.name}
        _write_csv(rows, tmp / METRICS_FILE)
        result = {
            "l2l_scale_evaluation": EVALUATION_VERSION,
            "provenance": prov,
            "parameters": parameters,
            "images": [im.describe() for im in ([tgt] + ([inp] if inp else []) + rest + ([tru] if tru else []))],
            "order": [im.name for im in rows_images],
            "metrics": [_json_value(r) for r in rows],
            "metrics_csv": METRICS_FILE,
            "patches": {"size": psize, "corners": corners.astype(int).tolist()},
            "maps": maps,
            "models": model_dirs,
            "crossval": str(Path(crossval).resolve()) if crossval is not None else None,
        }
        # Written last: a folder with evaluation.json is a finished evaluation.
        (tmp / EVALUATION_FILE).write_text(json.dumps(_json_value(result), indent=2))
    return output_dir


def format_table(rows: Sequence[dict], reference: str = "target", region: str | None = None) -> str:
    """A plain-text Table 1 (one line per image) of the rows of one reference and region, for the CLI."""
    if region is None:
        region = "patches" if any(r["region"] == "patches" for r in rows) else "image"
    sel = [r for r in rows if r["reference"] == reference and r["region"] == region]
    cols = ("psnr", "nrmse", "ms_ssim_5", "ms_ssim_3", "ms_ssim_1", "pcc", "tolerance_level", "michelson", "rms")
    heads = ("PSNR", "NRMSE", "MS-SSIM5", "MS-SSIM3", "MS-SSIM1", "PCC", "TL", "Michelson", "RMS")
    width = max([len(r["method"]) for r in sel] + [6]) + 2
    lines = [f"vs {reference}, {region}" + (f" (n={sel[0]['n_patches']})" if sel and region == "patches" else ""),
             f"{'':<{width}}" + "".join(f"{h:>10}" for h in heads)]
    for r in sel:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{'-':>10}" if v is None else f"{v:>10.2f}" if c == "psnr" else f"{v:>10.3f}")
        lines.append(f"{r['method']:<{width}}" + "".join(cells))
    return "\n".join(lines)

