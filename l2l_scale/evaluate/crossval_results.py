"""The result files of a cross-validation: fold values, ``crossval.json`` and ``crossval.csv``.

A fold's value is the relative change of its means over the held-out pairs (see :mod:`l2l_scale.evaluate.crossval`);
the summary lists them per N with their mean, sample standard deviation and per-repeat means, in the schema that
:func:`l2l_scale.evaluate.report.load_crossval` reads. Every file is written atomically and stays valid JSON
(non-finite values become ``null``).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from l2l_scale.io.atomic import write_json

if TYPE_CHECKING:
    from l2l_scale.evaluate.crossval import CrossvalPlan

CROSSVAL_VERSION = 1
_METRICS = ("psnr", "nrmse", "ms_ssim_5", "ms_ssim_3", "ms_ssim_1")
_CSV_COLUMNS = ("pairs", "repeat", "fold", "id", "n_train", "n_test", "epochs", "nrmse_input", "nrmse_restored",
                "nrmse_rel_change", "ms_ssim_5_input", "ms_ssim_5_restored", "ssim5_rel_change", "psnr_input",
                "psnr_restored")


def _write_json_atomic(path: Path, obj: Any) -> None:
    write_json(path, obj, indent=1, allow_nan=False)  # results must stay valid JSON for other tools


def _finite(v: Any) -> float | None:
    """A float for JSON: NaN/Inf become ``None`` (``null``), which ``load_crossval`` reads back as NaN."""
    v = float(v)
    return v if math.isfinite(v) else None


def _as_float(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _rel_change(restored: float, inp: float) -> float:
    with np.errstate(all="ignore"):
        return float((np.float64(restored) - inp) / np.float64(inp)) if inp else float("nan")


def _fold_summary(per_pair: list[dict]) -> dict:
    """Means over the held-out pairs and the fold's relative changes of NRMSE and 5-scale MS-SSIM."""
    mean = {role: {m: _nanmean([_as_float(p[role][m]) for p in per_pair]) for m in _METRICS}
            for role in ("input", "restoration")}
    rel = {}
    for m, name in (("nrmse", "nrmse_rel_change"), ("ms_ssim_5", "ssim5_rel_change")):
        rel[name] = _finite(_rel_change(_as_float(mean["restoration"][m]), _as_float(mean["input"][m])))
    return {"mean": mean, **rel}



def _fmt(v: Any, signed: bool = True) -> str:
    v = _as_float(v)
    return "nan" if not math.isfinite(v) else (f"{v:+.3f}" if signed else f"{v:.3f}")


def _nanmean(values: Any) -> float | None:
    """Mean of the finite values; ``None`` when there is none (e.g. every input metric was 0)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None


def _sd(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.std(finite, ddof=1)) if finite.size > 1 else 0.0 if finite.size else float("nan")


def _summarise(plan: CrossvalPlan, results: list[dict]) -> dict:
    """The ``crossval.json`` content from the fold results (read from disk, so a resumed run gives the same)."""
    from l2l_scale.io.prov import provenance

    s = plan.settings
    by_n: dict[str, dict] = {}
    for n, reps in zip(s["pairs"], s["repeats"]):
        rows = sorted((r for r in results if r["pairs"] == n), key=lambda r: (r["repeat"], r["fold"]))
        entry: dict[str, Any] = {"repeats": reps, "folds": s["folds"], "epochs": s["epochs"][str(n)]}
        values = {m: np.array([_as_float(r[m]) for r in rows], dtype=np.float64)
                  for m in ("nrmse_rel_change", "ssim5_rel_change")}
        entry.update({m: [_finite(v) for v in vals] for m, vals in values.items()})
        entry["mean"] = {m: _nanmean(v) for m, v in values.items()}
        entry["sd"] = {m: _finite(_sd(v)) for m, v in values.items()}
        entry["repeat_mean"] = {m: [_nanmean([_as_float(r[m]) for r in rows if r["repeat"] == rep])
                                    for rep in range(reps)] for m in values}
        entry["index"] = [[r["repeat"], r["fold"]] for r in rows]
        by_n[str(n)] = entry
    name = s["preset"] or plan.dataset.name.removesuffix(".zarr")
    return {
        "l2l_scale_crossval": CROSSVAL_VERSION,
        "dataset": name,
        "source": s["dataset"],
        "folds": s["folds"],
        "channels": s["channels"],
        "mode": s["mode"],
        "pairs": by_n,
        "definition": "(m(restoration, reference) - m(input, reference)) / m(input, reference) of the means over "
                      "each fold's held-out pairs; m = NRMSE (min-max) or 5-scale MS-SSIM on whole images, each "
                      "normalised with its own exact percentiles; one value per (repeat, fold), repeat-major",
        "provenance": provenance(s, s["dataset"], command=plan.command),
    }


def _write_csv(results: list[dict], path: Path) -> None:
    rows = sorted(results, key=lambda r: (r["pairs"], r["repeat"], r["fold"]))
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(_CSV_COLUMNS)
        for r in rows:
            mi, mr = r["mean"]["input"], r["mean"]["restoration"]
            vals = [r["pairs"], r["repeat"], r["fold"], r["id"], len(r["train_keys"]), len(r["test_keys"]),
                    r["epochs"], mi["nrmse"], mr["nrmse"], r["nrmse_rel_change"], mi["ms_ssim_5"], mr["ms_ssim_5"],
                    r["ssim5_rel_change"], mi["psnr"], mr["psnr"]]
            w.writerow(["nan" if v is None else (repr(float(v)) if isinstance(v, float) else v) for v in vals])
    os.replace(tmp, path)


