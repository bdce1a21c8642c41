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
``evaluation.json`` nor ``crossval.json`` is an error that names the command producing them. This module collects
the data; :mod:`l2l_scale.evaluate.render` draws the page.

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
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from l2l_scale.errors import InputError
from l2l_scale.evaluate.render import render_html

__all__ = ["CROSSVAL_FILE", "load_crossval", "load_results", "read_history", "report"]

CROSSVAL_FILE = "crossval.json"
REPORT_FILE = "report.html"
_EVALUATION_FILE = "evaluation.json"


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
