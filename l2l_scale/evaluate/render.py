"""The HTML page of ``l2l-scale report``: figures, metric tables and provenance of loaded results.

Rendering
---------
Figures are PNGs drawn with matplotlib's Agg canvas (``matplotlib.figure.Figure``, no pyplot state) and
embedded as base64 data URIs, so the report is one file that can be mailed or archived. A small inline script
sets ``data-loaded="true"`` on ``<body>`` once every image has decoded (``complete && naturalWidth > 0``),
which the tests check in headless Chromium.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from l2l_scale.errors import ConfigError

__all__ = ["render_html"]

_HIGHER = {"psnr": True, "nrmse": False, "ms_ssim_5": True, "ms_ssim_3": True, "ms_ssim_1": True, "pcc": True,
           "tolerance_level": False}
_HEADS = {"psnr": "PSNR (dB)", "nrmse": "NRMSE", "ms_ssim_5": "MS-SSIM M=5", "ms_ssim_3": "MS-SSIM M=3",
          "ms_ssim_1": "MS-SSIM M=1", "pcc": "PCC", "tolerance_level": "Tolerance level", "michelson": "Michelson",
          "rms": "RMS contrast"}


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
    from l2l_scale.evaluate.images import ImageSpec, load_image

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
