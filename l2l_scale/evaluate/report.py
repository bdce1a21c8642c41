"""``l2l-scale report``: one self-contained HTML file that shows an evaluation at a glance.

How the report finds its inputs
-------------------------------
Everything starts from a results folder ``RESULTS_DIR``:

* ``RESULTS_DIR/evaluation.json`` (written by ``l2l-scale evaluate``, see :mod:`l2l_scale.evaluate.evaluate`):
  the compared images (absolute paths, channels, normalisation values, provenance), the metric rows, the patch
  positions, the difference maps (``maps/<method>.zarr``, relative to the folder) and the model folders (named
  with ``--model`` or found in a prediction's provenance).
* A cross-validation summary: ``RESULTS_DIR/crossval.json``, or the file named by ``evaluate --crossval``.
* Model folders: those listed in ``evaluation.json``, plus every folder in ``RESULTS_DIR/models/``. Their
  training curves come from ``history.csv`` (``MODEL/logs/history.csv`` as ``l2l-scale train`` writes it, or
  ``MODEL/history.csv``; columns ``epoch, loss, val_loss`` and ``lr`` or ``learning_rate``) and their metadata
  from ``MODEL/l2l_scale.json``.

Images are read lazily and only the crops (and the coarsest pyramid level of each map) are loaded, so the
report of a whole-slide evaluation stays small and quick. Sections without data (no truth, no cross-validation,
no model, an image that moved) are left out with a note instead of failing. A folder with neither
``evaluation.json`` nor ``crossval.json`` is an error that names the command producing them.

The ``crossval.json`` schema
----------------------------
Written by the cross-validation command (paper Fig. 5 / Table 3)::

    {
      "l2l_scale_crossval": 1,                  # optional format version
      "dataset": "actin",                       # optional, shown in the caption
      "folds": 8,                               # optional, k of the k-fold split by image pair
      "pairs": {                                # N training pairs -> one value per (repeat, fold) test set
        "8":  {"nrmse_rel_change": [-0.31, ...], "ssim5_rel_change": [0.42, ...], "repeats": 10},
        "16": {"nrmse_rel_change": [...], "ssim5_rel_change": [...]}
      },
      "provenance": {...}                       # optional, the l2l_scale provenance block
    }

A relative change is ``(m(restoration, target) - m(input, target)) / m(input, target)`` for the NRMSE and the
5-scale SSIM (negative is better for the NRMSE, positive for the SSIM).

Rendering
---------
Figures are PNGs drawn with matplotlib's Agg canvas (``matplotlib.figure.Figure``, no pyplot state) and
embedded as base64 data URIs, so the report is one file that can be mailed or archived. A small inline script
sets ``data-loaded="true"`` on ``<body>`` once every image has decoded (``complete && naturalWidth > 0``),
which the tests check in headless Chromium.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from l2l_scale.errors import ConfigError, InputError

__all__ = ["CROSSVAL_FILE", "load_crossval", "load_results", "read_history", "render_html", "report"]

CROSSVAL_FILE = "crossval.json"
REPORT_FILE = "report.html"
_EVALUATION_FILE = "evaluation.json"
_HIGHER = {"psnr": True, "nrmse": False, "ms_ssim_5": True, "ms_ssim_3": True, "ms_ssim_1": True, "pcc": True,
           "tolerance_level": False}
_HEADS = {"psnr": "PSNR (dB)", "nrmse": "NRMSE", "ms_ssim_5": "MS-SSIM M=5", "ms_ssim_3": "MS-SSIM M=3",
          "ms_ssim_1": "MS-SSIM M=1", "pcc": "PCC", "tolerance_level": "Tolerance level", "michelson": "Michelson",
          "rms": "RMS contrast"}
_MAX_MAP_SIDE = 1024  # the coarsest pyramid level written is at most this large


# ------------------------------------------------------------------------------------------------- loading


def _read_json(path: Path, what: str, fix: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: {what} is not readable JSON ({exc.__class__.__name__}); {fix}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: {what} is not a JSON object; {fix}")
    return data


def load_crossval(path: str | Path) -> dict:
    """Read and validate a ``crossval.json`` (see the module notes).

    Returns
    -------
    dict
        ``{"pairs": {N (int): {"nrmse_rel_change": ndarray, "ssim5_rel_change": ndarray, ...}}, ...}`` sorted by N.

    Raises
    ------
    InputError
        Unreadable JSON, or ``pairs`` not in the documented shape.
    """
    path = Path(path)
    fix = "rerun 'l2l-scale crossval' (expected {\"pairs\": {N: {\"nrmse_rel_change\": [...], " \
          "\"ssim5_rel_change\": [...]}}})"
    data = _read_json(path, "the cross-validation summary", fix)
    pairs = data.get("pairs")
    if not isinstance(pairs, dict) or not pairs:
        raise InputError(f"{path}: no 'pairs' in the cross-validation summary; {fix}")
    out = {}
    for key, entry in pairs.items():
        try:
            n = int(key)
        except (TypeError, ValueError):
            raise InputError(f"{path}: pairs key {key!r} is not a number of training pairs; {fix}") from None
        if not isinstance(entry, dict):
            raise InputError(f"{path}: pairs[{key!r}] is not an object; {fix}")
        values = {}
        for metric in ("nrmse_rel_change", "ssim5_rel_change"):
            raw = entry.get(metric, [])
            try:
                values[metric] = np.asarray([np.nan if v is None else v for v in raw], dtype=np.float64)
            except (TypeError, ValueError):
                raise InputError(f"{path}: pairs[{key!r}][{metric!r}] is not a list of numbers; {fix}") from None
        values.update({k: v for k, v in entry.items() if k not in values})
        out[n] = values
    return {**data, "pairs": dict(sorted(out.items())), "path": str(path)}


def read_history(model_dir: str | Path) -> dict[str, np.ndarray] | None:
    """Training history of a model folder (``logs/history.csv`` or ``history.csv``), or None.

    Returns
    -------
    dict or None
        Columns as float arrays (empty cells are NaN); ``lr`` is provided for ``learning_rate`` too.
    """
    model_dir = Path(model_dir)
    for path in (model_dir / "logs" / "history.csv", model_dir / "history.csv"):
        if path.is_file():
            break
    else:
        return None
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error):
        return None
    if not rows or "epoch" not in rows[0]:
        return None

    def num(v: Any) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            return float("nan")

    cols = {k: np.array([num(r.get(k)) for r in rows]) for k in rows[0] if k}
    if "lr" not in cols and "learning_rate" in cols:
        cols["lr"] = cols["learning_rate"]
    return cols


def _model_entries(results_dir: Path, ev: dict | None) -> dict[str, dict]:
    """{name: {"path", "history", "metadata"}} for the models named in the evaluation or under ``models/``."""
    paths: dict[str, Path] = {}
    for name, entry in ((ev or {}).get("models") or {}).items():
        p = entry.get("path") if isinstance(entry, dict) else entry
        if p:
            paths[str(name)] = Path(p)
    extra = results_dir / "models"
    if extra.is_dir():
        for child in sorted(extra.iterdir()):
            if child.is_dir() and child.name not in paths:
                paths[child.name] = child
    out = {}
    for name, p in paths.items():
        meta = None
        if (p / "l2l_scale.json").is_file():
            try:
                meta = json.loads((p / "l2l_scale.json").read_text())
            except (OSError, ValueError):
                meta = {"error": "l2l_scale.json is not readable JSON"}
        out[name] = {"path": str(p), "exists": p.is_dir(), "history": read_history(p) if p.is_dir() else None,
                     "metadata": meta}
    return out


def load_results(results_dir: str | Path) -> dict:
    """Collect everything the report shows from a results folder (see the module notes).

    Returns
    -------
    dict
        ``{"dir", "evaluation" (dict or None), "crossval" (dict or None), "models" ({name: ...})}``.

    Raises
    ------
    InputError
        The folder does not exist or holds neither ``evaluation.json`` nor ``crossval.json``, or one is broken.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise InputError(f"{results_dir}: results folder does not exist; run 'l2l-scale evaluate --target "
                         f"IMAGE[:CHANNEL] --method NAME=IMAGE ... {results_dir}' first")
    ev = None
    ev_path = results_dir / _EVALUATION_FILE
    if ev_path.is_file():
        ev = _read_json(ev_path, "the evaluation", "rerun 'l2l-scale evaluate ... --overwrite'")
        if "l2l_scale_evaluation" not in ev:
            raise InputError(f"{ev_path}: not written by 'l2l-scale evaluate' (no l2l_scale_evaluation key); "
                             "rerun the evaluation")
    cv_path = results_dir / CROSSVAL_FILE
    if not cv_path.is_file() and ev and ev.get("crossval"):
        cv_path = Path(ev["crossval"])
    cv = load_crossval(cv_path) if cv_path.is_file() else None
    if ev is None and cv is None:
        raise InputError(f"no evaluation results in {results_dir}; run 'l2l-scale evaluate --target "
                         f"IMAGE[:CHANNEL] --method NAME=IMAGE ... {results_dir}' first")
    return {"dir": str(results_dir), "evaluation": ev, "crossval": cv, "models": _model_entries(results_dir, ev)}


# ------------------------------------------------------------------------------------------------- figures


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    # A Figure without pyplot: Agg canvas, no global state, safe in threads and on headless machines.
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img class="figure" src="{uri}" alt="{html.escape(alt)}">'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _crop_box(ev: dict, crop_size: int, crop: Sequence[int] | None) -> tuple[int, int, int, int]:
    """(y0, x0, height, width) of the crop: given, or centred on the first foreground patch."""
    ny, nx = ev["images"][0]["shape"]
    h, w = min(int(crop_size), ny), min(int(crop_size), nx)
    if crop is not None:
        y0, x0 = int(crop[0]), int(crop[1])
        if not (0 <= y0 < ny and 0 <= x0 < nx):
            raise ConfigError(f"crop corner {y0},{x0} lies outside the {ny}x{nx} image; pick Y,X inside it")
    else:
        corners = (ev.get("patches") or {}).get("corners") or []
        size = int((ev.get("patches") or {}).get("size") or 0)
        cy, cx = (corners[0][0] + size // 2, corners[0][1] + size // 2) if corners else (ny // 2, nx // 2)
        y0, x0 = cy - h // 2, cx - w // 2
    return max(0, min(y0, ny - h)), max(0, min(x0, nx - w)), h, w


def _read_crop(entry: dict, box: tuple[int, int, int, int]) -> np.ndarray | None:
    """The crop of one compared image in display units (its normalisation), or None if it cannot be read."""
    from l2l_scale.evaluate.evaluate import ImageSpec, load_image

    y0, x0, h, w = box
    try:
        data, _ = load_image(ImageSpec(Path(entry["path"]), entry.get("channel")), what=entry["name"])
        crop = np.asarray(data.data[y0:y0 + h, x0:x0 + w].compute(), dtype=np.float64)
    except Exception:  # a moved or deleted image: the panel is skipped, the report still renders
        return None
    norm = entry.get("normalization")
    if norm:
        crop = (crop - norm["lo"]) / (norm["hi"] - norm["lo"])
    return crop


def _fig_crops(ev: dict, box: tuple[int, int, int, int]) -> tuple[str, list[str]]:
    order = ev.get("order") or []
    entries = {e["name"]: e for e in ev["images"]}
    names = [n for n in order if n != "target"] + ["target"] + (["truth"] if "truth" in entries else [])
    crops, missing = [], []
    for n in names:
        c = _read_crop(entries[n], box)
        (crops.append((n, c)) if c is not None else missing.append(n))
    if not crops:
        return "", missing
    if ev["parameters"]["normalize"] == "percentile":
        vmin, vmax = 0.0, 1.0  # every image's low/high percentile
    else:  # raw values: one window for all, from the target (or the first readable) crop
        ref = dict(crops).get("target", crops[0][1])
        vmin, vmax = (float(v) for v in np.percentile(ref, (0.1, 99.9)))
        vmax = vmax if vmax > vmin else vmin + 1.0
    ncol = min(len(crops), 4)
    nrow = math.ceil(len(crops) / ncol)
    fig = _figure(3.2 * ncol, 3.4 * nrow)
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, (n, c) in zip(axes, crops):
        ax.imshow(c, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
        role = entries[n]["role"]
        ax.set_title(n if role != "method" else f"{n} (restoration)", fontsize=10)
    return _png(fig), missing


def _fig_contrast(rows: list[dict], order: list[str]) -> str | None:
    regions = [r for r in ("image", "patches") if any(x["region"] == r for x in rows)]
    data = {}
    for reg in regions:
        sel = {x["method"]: x for x in rows if x["region"] == reg and x["reference"] == "target"}
        data[reg] = [(sel.get(n) or {}) for n in order]
    if not any(d.get("michelson") is not None for reg in regions for d in data[reg]):
        return None
    fig = _figure(max(6.0, 1.3 * len(order) + 3), 3.4)
    axes = fig.subplots(1, 2)
    x = np.arange(len(order))
    width = 0.8 / max(1, len(regions))
    for ax, metric, title in zip(axes, ("michelson", "rms"), ("Michelson contrast", "RMS contrast")):
        for i, reg in enumerate(regions):
            vals = [np.nan if d.get(metric) is None else d[metric] for d in data[reg]]
            ax.bar(x + (i - (len(regions) - 1) / 2) * width, vals, width, label=reg)
        ax.set_xticks(x, order, rotation=30, ha="right")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    names = {"image": "whole image", "patches": "foreground patches"}
    fig.legend(handles, [names.get(lab, lab) for lab in labels], loc="outside upper center", ncols=len(labels),
               fontsize=8, frameon=False)
    return _png(fig)


def _fig_crossval(cv: dict) -> str | None:
    pairs = cv["pairs"]
    ns = list(pairs)
    metrics = [("nrmse_rel_change", "relative change of NRMSE"), ("ssim5_rel_change", "relative change of 5S-SSIM")]
    if not any(np.isfinite(pairs[n][m]).any() for n in ns for m, _ in metrics):
        return None
    fig = _figure(9.0, 3.6)
    axes = fig.subplots(1, 2)
    for ax, (m, title) in zip(axes, metrics):
        vals = [pairs[n][m][np.isfinite(pairs[n][m])] for n in ns]
        keep = [i for i, v in enumerate(vals) if v.size]
        if keep:
            ax.boxplot([vals[i] for i in keep], positions=list(range(len(keep))), widths=0.6)
            ax.set_xticks(range(len(keep)), [str(ns[i]) for i in keep])
        ax.axhline(0.0, color="0.5", lw=0.8, ls="--")
        ax.set_xlabel("training image pairs N")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _fig_training(models: dict[str, dict]) -> str | None:
    hist = {n: m["history"] for n, m in models.items() if m.get("history") and m["history"].get("epoch") is not None}
    hist = {n: h for n, h in hist.items() if np.isfinite(h.get("loss", np.array([np.nan]))).any()}
    if not hist:
        return None
    has_lr = any(np.isfinite(h.get("lr", np.array([np.nan]))).any() for h in hist.values())
    fig = _figure(10.0 if has_lr else 6.5, 3.6)
    axes = np.atleast_1d(fig.subplots(1, 2 if has_lr else 1))
    colors = [f"C{i % 10}" for i in range(len(hist))]
    for (name, h), col in zip(hist.items(), colors):
        axes[0].plot(h["epoch"], h["loss"], color=col, label=f"{name} loss")
        if "val_loss" in h and np.isfinite(h["val_loss"]).any():
            axes[0].plot(h["epoch"], h["val_loss"], color=col, ls="--", label=f"{name} val_loss")
        if has_lr and "lr" in h:
            axes[1].plot(h["epoch"], h["lr"], color=col, label=name)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss")
    axes[0].set_title("training (solid) and validation (dashed) loss", fontsize=10)
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    if has_lr:
        axes[1].set_yscale("log")
        axes[1].set_xlabel("epoch")
        axes[1].set_title("learning rate", fontsize=10)
        axes[1].grid(alpha=0.3)
    return _png(fig)


def _fig_maps(ev: dict, results_dir: Path, box: tuple[int, int, int, int]) -> tuple[str | None, list, list]:
    """Per method: the whole RMS map (coarsest level), its crop, and the SSIM crop. Returns (uri, provs, missing)."""
    from matplotlib.patches import Rectangle

    from l2l_scale.io.read import open_image

    y0, x0, h, w = box
    rows, provs, missing = [], [], []
    for name, entry in (ev.get("maps") or {}).items():
        path = results_dir / entry["path"]
        try:
            full = open_image(path)
            top = open_image(path, level=-1)
            overview = np.asarray(top.sel(c="rms").values, dtype=np.float64)
            rms_crop = np.asarray(full.sel(c="rms").data[y0:y0 + h, x0:x0 + w].compute(), dtype=np.float64)
            ssim_crop = np.asarray(full.sel(c="ssim").data[y0:y0 + h, x0:x0 + w].compute(), dtype=np.float64)
        except Exception:  # a deleted map: left out, the rest renders
            missing.append(name)
            continue
        factor = full.sizes["y"] / top.sizes["y"]
        rows.append((name, entry.get("reference", "input"), overview, rms_crop, ssim_crop, factor))
        provs.append((f"difference maps {name} ({entry['path']})", full.attrs.get("l2l_scale")))
    if not rows:
        return None, provs, missing
    vmax = max(float(np.nanpercentile(r[3], 99.5)) for r in rows) or 1.0
    fig = _figure(10.5, 3.3 * len(rows))
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for (name, ref, overview, rms_crop, ssim_crop, factor), ax in zip(rows, axes):
        im0 = ax[0].imshow(overview, cmap="magma", vmin=0, vmax=vmax)
        ax[0].add_patch(Rectangle((x0 / factor - 0.5, y0 / factor - 0.5), w / factor, h / factor, fill=False,
                                  ec="cyan", lw=1))
        ax[0].set_title(f"RMS map {ref} vs {name}", fontsize=10)
        ax[1].imshow(rms_crop, cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        ax[1].set_title("RMS map (crop)", fontsize=10)
        im2 = ax[2].imshow(ssim_crop, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax[2].set_title(f"SSIM map {ref} vs {name} (crop)", fontsize=10)
        for a in ax:
            a.set_axis_off()
        fig.colorbar(im0, ax=ax[:2], shrink=0.8, label="local RMS difference")
        fig.colorbar(im2, ax=ax[2], shrink=0.8, label="local SSIM")
    return _png(fig), provs, missing


# ---------------------------------------------------------------------------------------------------- html


def _fmt(v: Any, col: str) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, float) and not math.isfinite(v):
        return html.escape(str(v))
    return f"{v:.2f}" if col == "psnr" else f"{v:.3f}"


def _tables(rows: list[dict]) -> str:
    out = []
    blocks = []
    for region in ("patches", "image"):
        for ref in ("target", "truth"):
            sel = [r for r in rows if r["region"] == region and r["reference"] == ref]
            if sel:
                blocks.append((region, ref, sel))
    cols = [c for c in _HEADS if any(r.get(c) is not None for r in rows)]
    for region, ref, sel in blocks:
        best = {}
        for c, higher in _HIGHER.items():
            vals = [r[c] for r in sel if r.get(c) is not None and math.isfinite(r[c]) and r["role"] != "target"]
            if len(vals) > 1:
                best[c] = max(vals) if higher else min(vals)
        n = sel[0].get("n_patches")
        where = f"{n} foreground patches" if region == "patches" else "whole image"
        head = "".join(f"<th>{html.escape(_HEADS[c])}</th>" for c in cols)
        body = []
        for r in sel:
            cells = []
            for c in cols:
                v = r.get(c)
                strong = c in best and v is not None and r["role"] != "target" and v == best[c]
                text = _fmt(v, c)
                cells.append(f"<td class=\"best\">{text}</td>" if strong else f"<td>{text}</td>")
            body.append(f"<tr><th>{html.escape(r['method'])}</th>{''.join(cells)}</tr>")
        out.append(f"<h3>against the {html.escape(ref)}, {html.escape(where)}</h3>"
                   f"<table><thead><tr><th>image</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
    return "\n".join(out)


def _provenance_block(title: str, obj: Any) -> str:
    text = json.dumps(obj, indent=2, default=str) if obj is not None else "(none recorded)"
    return f"<details><summary>{html.escape(title)}</summary><pre>{html.escape(text)}</pre></details>"


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1250px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 2px solid #ccd; padding-bottom: 0.2em; margin-top: 1.8em; }
h3 { font-size: 1.0em; margin-bottom: 0.3em; }
table { border-collapse: collapse; margin-bottom: 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccd; padding: 0.25em 0.6em; text-align: right; }
thead th { background: #eef; } tbody th { text-align: left; background: #f7f7fb; }
td.best { font-weight: bold; background: #e6f4e6; }
img.figure { max-width: 100%; display: block; margin: 0.5em 0; border: 1px solid #eee; }
.note { color: #666; font-style: italic; } .meta { color: #555; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
details { margin: 0.3em 0; } summary { cursor: pointer; }
"""

# Marks the page as loaded once every <img> has decoded; headless checks read data-loaded / data-images-ok.
_SCRIPT = """
(function () {
  function mark() {
    var imgs = document.images, ok = 0;
    for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; } }
    document.body.setAttribute('data-images', String(imgs.length));
    document.body.setAttribute('data-images-ok', String(ok));
    document.body.setAttribute('data-loaded', ok === imgs.length ? 'true' : 'false');
  }
  if (document.readyState === 'complete') { mark(); } else { window.addEventListener('load', mark); }
})();
"""


def render_html(results: dict, *, crop_size: int = 256, crop: Sequence[int] | None = None) -> str:
    """The report page for :func:`load_results`' output.

    Parameters
    ----------
    results : dict
        From :func:`load_results`.
    crop_size : int
        Side in px of the image crops (clipped to the image).
    crop : (int, int), optional
        Top-left corner (y, x) of the crops; default: centred on the first foreground patch.

    Returns
    -------
    str
        A complete HTML document with every figure embedded.
    """
    from l2l_scale import __version__

    if int(crop_size) < 8:
        raise ConfigError(f"crop size {crop_size} is too small; use e.g. --crop-size 256")
    ev, cv, models = results["evaluation"], results["crossval"], results["models"]
    results_dir = Path(results["dir"])
    parts: list[str] = []
    provs: list[tuple[str, Any]] = []
    toc: list[tuple[str, str]] = []

    def section(anchor: str, title: str, body: str) -> None:
        toc.append((anchor, title))
        parts.append(f'<section id="{anchor}"><h2>{html.escape(title)}</h2>\n{body}</section>')

    if ev is not None:
        box = _crop_box(ev, crop_size, crop)
        uri, missing = _fig_crops(ev, box)
        y0, x0, h, w = box
        norm = ev["parameters"]["normalize"]
        q = ev["parameters"].get("percentiles")
        scale = (f"every image mapped from its own percentiles {q[0]:g} / {q[1]:g} to 0 / 1, shown on 0..1"
                 if norm == "percentile" else "raw values, one display range from the target crop")
        body = ""
        if uri:
            body += (f'<p class="meta">{h}x{w} px at y={y0}, x={x0}; same display range for all: {html.escape(scale)}.'
                     f"</p>{_img(uri, 'image crops')}")
        if missing:
            body += _note(f"not readable any more (moved or deleted): {', '.join(missing)}")
        if uri or missing:
            section("crops", "Images", body)

        rows = ev.get("metrics") or []
        if rows:
            p = ev["parameters"]
            pt = p.get("patches") or {}
            meta = (f"Normalisation: {html.escape(str(p.get('normalize')))} "
                    f"{html.escape(str(p.get('percentiles')))}; data range {html.escape(str(p.get('data_range')))}; "
                    f"patches: {pt.get('n')} x {pt.get('size')}<sup>2</sup> px, seed {pt.get('seed')}, selected on "
                    f"the raw target; smoothing sigma {p.get('smooth')}. Best value per column in bold "
                    f"(the target label's own row excluded). Values in "
                    f"<code>{html.escape(str(results_dir / ev.get('metrics_csv', 'metrics.csv')))}</code>.")
            section("metrics", "Metrics (Table 1)", f'<p class="meta">{meta}</p>\n{_tables(rows)}')
            cfig = _fig_contrast(rows, ev.get("order") or [])
            if cfig:
                c = p.get("contrast") or {}
                section("contrast", "Contrast",
                        f'<p class="meta">Michelson and RMS contrast (Peli 1990) with the paper\'s recipe: Gaussian '
                        f'sigma {c.get("sigma")}, normalised to the {html.escape(str(c.get("percentiles")))} '
                        f'percentiles, brightest {100 * float(c.get("top_fraction") or 0):g} % of the pixels as the sample.</p>'
                        + _img(cfig, "contrast bars"))
        mfig, map_provs, map_missing = _fig_maps(ev, results_dir, box)
        provs += map_provs
        body = ""
        if mfig:
            mp = (ev["parameters"].get("maps") or {})
            body += (f'<p class="meta">Local RMS difference (Gaussian sigma {(mp.get("rms") or {}).get("sigma")} px) '
                     f'and local SSIM (sigma 1.5) between the {html.escape(str(mp.get("reference")))} and each '
                     "restoration, on the normalised images; the cyan box marks the crop.</p>"
                     + _img(mfig, "difference maps"))
        if map_missing:
            body += _note(f"maps not readable: {', '.join(map_missing)}")
        if body:
            section("maps", "Difference maps", body)

    if cv is not None:
        fig = _fig_crossval(cv)
        if fig:
            caption = (f"{cv.get('folds')}-fold " if cv.get("folds") else "") + "cross-validation split by image pair"
            if cv.get("dataset"):
                caption += f", {cv['dataset']}"
            section("crossval", "Cross-validation",
                    f'<p class="meta">{html.escape(caption)}: relative change of the NRMSE and the 5-scale SSIM '
                    f"of the restoration against the input (both against the target), per test fold; from "
                    f"<code>{html.escape(cv['path'])}</code>.</p>" + _img(fig, "cross-validation box plots"))
        provs.append((f"cross-validation ({cv['path']})", cv.get("provenance")))

    tfig = _fig_training(models)
    if tfig:
        section("training", "Training", _img(tfig, "training curves"))
    no_hist = [n for n, m in models.items() if not m.get("history")]
    if no_hist and tfig:
        parts.append(_note(f"no history.csv for: {', '.join(no_hist)}"))

    blocks = []
    if ev is not None:
        blocks.append(_provenance_block("evaluation (evaluation.json)", ev.get("provenance")))
        for e in ev["images"]:
            blocks.append(_provenance_block(f"{e['name']} ({e['role']}): {e['spec']}", e.get("provenance")))
    for title, prov in provs:
        blocks.append(_provenance_block(title, prov))
    for name, m in models.items():
        blocks.append(_provenance_block(f"model {name}: {m['path']}/l2l_scale.json", m.get("metadata")))
    if blocks:
        section("provenance", "Provenance", "\n".join(blocks))

    created = (ev or {}).get("provenance", {}).get("created", "")
    nav = " &middot; ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in toc)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>l2l-scale report: {html.escape(results_dir.name)}</title><style>{_CSS}</style></head>\n"
        f"<body data-loaded=\"false\"><h1>l2l-scale evaluation report</h1>"
        f"<p class=\"meta\">Results: <code>{html.escape(str(results_dir.resolve()))}</code>"
        + (f"; evaluated {html.escape(created)}" if created else "")
        + f"; report by l2l-scale {html.escape(__version__)}.</p><nav>{nav}</nav>\n"
        + "\n".join(parts) + f"\n<script>{_SCRIPT}</script></body></html>\n"
    )


def report(results_dir: str | Path, out: str | Path | None = None, *, crop_size: int = 256,
           crop: Sequence[int] | None = None, overwrite: bool = False) -> Path:
    """Write the self-contained HTML report of a results folder.

    Parameters
    ----------
    results_dir : str or Path
        Folder written by ``l2l-scale evaluate`` (and/or holding ``crossval.json``).
    out : str or Path, optional
        The HTML file (default ``RESULTS_DIR/report.html``).
    crop_size : int
        Side in px of the image crops.
    crop : (int, int), optional
        Top-left corner (y, x) of the crops.
    overwrite : bool
        Replace an existing report.

    Returns
    -------
    Path
        The report file.

    Raises
    ------
    InputError
        No results in the folder (the message names the command that writes them).
    OutputError
        The report exists (without ``overwrite``) or cannot be written.
    """
    from l2l_scale.io.output import check_output

    results = load_results(results_dir)
    out = Path(out) if out is not None else Path(results_dir) / REPORT_FILE
    check_output(out, overwrite=overwrite)
    page = render_html(results, crop_size=crop_size, crop=crop)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)  # a finished-looking report is always complete
    return out
