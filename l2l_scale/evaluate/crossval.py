"""Repeated k-fold cross-validation split by image pair (paper Fig. 5 / Table 3): ``l2l-scale crossval``.

How much does an L2L network depend on *which* image pairs it was trained on? The paper answers this with
repeated cross-validations in which whole image pairs, never patches, are held out. For every number of pairs
``N`` and every repeat ``r``:

1. draw ``N`` pairs from the dataset without replacement (a NumPy generator seeded by ``(seed, N, r)``);
2. split them into ``k`` folds (``numpy.array_split`` of the drawn order, so fold sizes differ by at most one);
3. for every fold: sample patches from the pairs of the *other* folds only, train a CARE U-Net on them, restore
   the held-out pairs, and compare input and restoration with the reference label.

A *pair* is one image of the dataset: a field of an HCS plate, an image in a folder. Folds never share a pair, and
a held-out pair never contributes a training patch.

Epochs grow linearly with N
---------------------------
``epochs = max(1, round(epochs_per_pair * N))``. The paper adapted the epochs to N "linearly" (Table 3):
20/40/60/120 epochs for N = 8/16/32/64 (actin, PXN) and 20/60/100 for N = 10/30/50 (tubulin, caveolae). A preset's
``epochs_per_pair`` is the paper's epochs at its largest N divided by that N, i.e. 120 / 64 = 1.875 (actin, PXN)
and 100 / 50 = 2.0 (tubulin, caveolae). This reproduces Table 3 exactly for tubulin and caveolae and for N = 32
and 64 of actin/PXN; the paper's 20 and 40 epochs at N = 8 and 16 correspond to ``--epochs-per-pair 2.5``.

Presets (Table 3)
-----------------
==========  =====  ===============  ============  ========  ================  ============
preset      folds  N                repeats       loss      lr / batch / steps  per pair
==========  =====  ===============  ============  ========  ================  ============
actin       8      8, 16, 32, 64    10, 5, 3, 2   ms-ssim3  5e-4 / 32 / 150   1.875 epochs
pxn         8      8, 16, 32, 64    10, 5, 3, 2   l1        5e-4 / 32 / 150   1.875 epochs
tubulin     10     10, 30, 50       8, 3, 2       ms-ssim3  5e-4 / 32 / 150   2.0 epochs
caveolae    10     10, 30, 50       8, 3, 2       ms-ssim3  1e-5 / 32 / 150   2.0 epochs
==========  =====  ===============  ============  ========  ================  ============

A preset also sets the channels, percentiles and augmentation of :mod:`l2l_scale.config`, and for caveolae the
Gaussian smoothing (sigma 1.5) applied before the metrics. As in the paper, the patch stores of the folds have no
validation split (``validation_fraction=0``: the held-out fold is the test); the best weights are then chosen by
the training loss. Explicit options override the preset.

Metrics and the relative change
-------------------------------
Each held-out pair is restored with :func:`l2l_scale.predict.predict` (tiled, the network output in normalised
units). The input label, the restoration and the reference label (the target channel unless
``reference_channel`` is given) are each normalised as ``l2l-scale evaluate`` does: with their own exact
whole-image percentiles (the training percentiles), unclipped, optionally smoothed. Then Table 1's metrics are
computed on the whole image (:func:`l2l_scale.evaluate.metrics.table1_metrics`, ``data_range=1``): PSNR, NRMSE
(min-max), MS-SSIM with 5, 3 and 1 scales. Whole images need a side of at least 97 px for 5-scale MS-SSIM.

The value of a fold is the relative change of its mean over the held-out pairs,

    rel_change = (mean_m(restoration, reference) - mean_m(input, reference)) / mean_m(input, reference)

for ``m`` = NRMSE (negative is better) and 5-scale MS-SSIM (positive is better). ``crossval.json`` lists one value
per (repeat, fold), repeat-major, which :func:`l2l_scale.evaluate.report.load_crossval` reads, with their mean,
sample standard deviation (``ddof=1``; 0 for one value) and the mean of every repeat (the paper's Fig. 5 plots
one point per cross-validation, i.e. per repeat).

Output folder
-------------
::

    OUT_DIR/
      run.json        the settings and the fold plan; --resume refuses different settings
      folds/ID.json   one per finished fold (ID = nNNN-rRR-fFF): pairs, per-pair metrics, training history
      work/ID/        a running fold's scratch: dataset views, patch store, model, restorations; removed when the
                      fold is done unless keep_work
      crossval.json   the summary (schema in :mod:`l2l_scale.evaluate.report`)
      crossval.csv    one row per fold: means of input and restoration, relative changes

Distribution and resuming
-------------------------
Every fold is one Dask task: with a distributed client the folds spread over the workers, each annotated with
``resources={"GPU": 1}`` when the cluster advertises GPUs (so one fold trains per GPU); without a client they run
one after the other in this process. On a worker, a fold task runs the fold in a fresh Python process (Keras seeds
its weight initialisers from Python's global ``random``, which the worker's own threads also draw from, so
training inside a worker would not be reproducible; the child also returns the fold's TensorFlow memory). A fold
runs its patch sampling, prediction and metrics with dask's threaded scheduler where it runs, so it never waits
for cluster slots or GPUs that other folds hold. One fold runs per worker process at a time; ``--workers`` sets
how many run at once on a LocalCluster.

A fold's JSON is written (atomically) only after the fold is complete. ``resume=True`` skips the folds whose JSON
exists and redoes the others from scratch. Training is seeded and, on CPUs, uses TensorFlow's deterministic
kernels, so a resumed run gives the same summary as an uninterrupted one, in this process or on a cluster. On
GPUs TensorFlow has no deterministic gradient for the U-Net's upsampling, so a retrained fold can differ from the
original by training noise.

The fold datasets are *views*: folders of symbolic links to the dataset's images (named ``IIII_KEY`` by the
pair's index ``IIII`` in the dataset, so an image keeps its name, and its sampled patches, in every fold). The
dataset is never modified or copied.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from l2l_scale.errors import ChannelError, ConfigError, InputError, OutputError
from l2l_scale.evaluate.crossval_results import CROSSVAL_VERSION, _fmt, _summarise, _write_csv, _write_json_atomic
from l2l_scale.evaluate.folds import _run_jobs
from l2l_scale.io.atomic import say as _say

__all__ = [
    "CROSSVAL_PRESETS",
    "CROSSVAL_VERSION",
    "CrossvalPlan",
    "crossval",
    "fold_assignments",
    "format_crossval_table",
    "plan_crossval",
    "run_crossval",
]

RUN_FILE = "run.json"
FOLDS_DIR = "folds"
WORK_DIR = "work"
SUMMARY_FILE = "crossval.json"
CSV_FILE = "crossval.csv"


@dataclass(frozen=True)
class CrossvalPreset:
    """The paper's Table 3 settings of one dataset."""

    folds: int
    pairs: tuple[int, ...]
    repeats: tuple[int, ...]
    epochs: tuple[int, ...]
    loss: str
    learning_rate: float
    batch_size: int = 32
    steps_per_epoch: int = 150
    smooth: float = 0.0

    @property
    def epochs_per_pair(self) -> float:
        """The epochs at the largest N divided by N (the linear rule's slope)."""
        return self.epochs[-1] / self.pairs[-1]


CROSSVAL_PRESETS: dict[str, CrossvalPreset] = {
    "actin": CrossvalPreset(8, (8, 16, 32, 64), (10, 5, 3, 2), (20, 40, 60, 120), "ms-ssim3", 5e-4),
    "pxn": CrossvalPreset(8, (8, 16, 32, 64), (10, 5, 3, 2), (20, 40, 60, 120), "l1", 5e-4),
    "tubulin": CrossvalPreset(10, (10, 30, 50), (8, 3, 2), (20, 60, 100), "ms-ssim3", 5e-4),
    "caveolae": CrossvalPreset(10, (10, 30, 50), (8, 3, 2), (20, 60, 100), "ms-ssim3", 1e-5, smooth=1.5),
}
_DEFAULT = {"folds": 8, "pairs": (8, 16, 32, 64), "repeats": (10, 5, 3, 2)}



# ---------------------------------------------------------------------------------------------------- planning


def fold_assignments(n_total: int, n_pairs: int, folds: int, seed: int, repeat: int) -> list[list[int]]:
    """The test pairs of every fold of one repeat: ``folds`` disjoint lists of dataset indices.

    Parameters
    ----------
    n_total : int
        Pairs in the dataset.
    n_pairs : int
        N, the pairs drawn for this cross-validation.
    folds : int
        k.
    seed, repeat : int
        The draw is seeded by ``(seed, n_pairs, repeat)``.

    Returns
    -------
    list of list of int
        Fold ``f``'s held-out pairs; its training pairs are the union of the other folds.
    """
    rng = np.random.default_rng([int(seed), int(n_pairs), int(repeat)])
    drawn = rng.choice(int(n_total), size=int(n_pairs), replace=False)  # random order: folds are its slices
    return [sorted(int(i) for i in part) for part in np.array_split(drawn, int(folds))]


def _ints(value: Any, what: str, example: str) -> tuple[int, ...]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, (int, np.integer)):
        parts = [value]
    else:
        parts = list(value)
    try:
        out = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {value!r} must be comma-separated whole numbers, e.g. {example}") from None
    if not out or any(v < 1 for v in out):
        raise ConfigError(f"{what} {value!r} must be positive whole numbers, e.g. {example}")
    return out


def _view_name(index: int, key: str) -> str:
    """The view entry of a pair: its dataset index (stable across folds) and its key, file-name safe."""
    safe = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in key)
    return f"{index:04d}_{safe}" if safe else f"{index:04d}"


@dataclass
class CrossvalPlan:
    """Everything a cross-validation run needs, validated; made by :func:`plan_crossval`.

    Attributes
    ----------
    dataset, out_dir : Path
    settings : dict
        JSON-able settings (recorded in ``run.json`` and compared on resume).
    jobs : list of dict
        One per fold, in (N, repeat, fold) order: the task's input.
    resume, overwrite, keep_work : bool
    command : str or None
        The command line recorded in the results' provenance (None: this process's).
    """

    dataset: Path
    out_dir: Path
    settings: dict
    jobs: list[dict] = field(default_factory=list)
    resume: bool = False
    overwrite: bool = False
    keep_work: bool = False
    command: str | None = None

    @property
    def n_folds_total(self) -> int:
        return len(self.jobs)


def plan_crossval(dataset: str | Path, out_dir: str | Path, *, input_channels: Sequence[str] | str | None = None,
                  target_channels: Sequence[str] | str | None = None, reference_channel: str | None = None,
                  mode: str = "l2l", preset: str | None = None, folds: int | None = None,
                  pairs: Sequence[int] | str | None = None, repeats: Sequence[int] | str | None = None,
                  epochs_per_pair: float | None = None, steps_per_epoch: int | None = None,
                  batch_size: int | None = None, learning_rate: float | None = None, loss: str | None = None,
                  unet_n_depth: int | None = None, unet_n_first: int | None = None,
                  unet_kern_size: int | None = None, patch_size: int | None = None,
                  patches_per_image: int | None = None, augment: bool | None = None,
                  percentiles: Sequence[float] | None = None, smooth: float | None = None,
                  tile: int | None = None, strategy: str | None = None, seed: int = 0, resume: bool = False,
                  overwrite: bool = False, keep_work: bool = False, precision: str | None = None,
                  command: str | None = None) -> CrossvalPlan:
    """Validate the options and the dataset and plan every fold; nothing is written or trained.

    See :func:`crossval` for the parameters. The checks here are cheap (image metadata only), so a command fails
    in a second, before a cluster starts.

    Raises
    ------
    ConfigError
        ``pairs`` and ``repeats`` of different lengths, fewer than 2 folds, an N smaller than the folds, no
        ``epochs_per_pair`` without a preset, or an invalid patch/training setting.
    InputError
        The dataset has fewer pairs than the folds or than the largest N, or an image lacks a channel.
    ChannelError
        Not exactly one input and one target channel, or an unknown channel.
    OutputError
        ``out_dir`` exists without ``resume``/``overwrite``, or overlaps the dataset.
    """
    from l2l_scale.config import get_preset, patch_config, train_config
    from l2l_scale.io.output import check_output
    from l2l_scale.io.read import list_images, open_image, require_exists

    dataset, out_dir = Path(dataset), Path(out_dir)
    if mode not in ("l2l", "n2n"):
        raise ConfigError(f"mode {mode!r} is not supported by crossval; use l2l or n2n")
    p = get_preset(preset)
    cv = None
    if p is not None:
        cv = CROSSVAL_PRESETS.get(p.name)
        if cv is None:
            raise ConfigError(f"preset {p.name!r} has no cross-validation settings (paper Table 3); use actin, "
                              "tubulin, caveolae or pxn, or pass --folds, --pairs, --repeats and --epochs-per-pair")
    k = int(folds) if folds is not None else (cv.folds if cv else _DEFAULT["folds"])
    ns = _ints(pairs, "--pairs", "8,16,32,64") if pairs is not None else (cv.pairs if cv else _DEFAULT["pairs"])
    rs = (_ints(repeats, "--repeats", "10,5,3,2") if repeats is not None
          else (cv.repeats if cv else _DEFAULT["repeats"]))
    if len(ns) != len(rs):
        raise ConfigError(f"--pairs has {len(ns)} values ({','.join(map(str, ns))}) but --repeats has {len(rs)} "
                          f"({','.join(map(str, rs))}); give one repeat count per N")
    if len(set(ns)) != len(ns):
        raise ConfigError(f"--pairs {','.join(map(str, ns))} lists an N twice; give each N once")
    if k < 2:
        raise ConfigError(f"--folds {k} must be at least 2 (k-fold cross-validation holds out 1/k of the pairs)")
    small = [n for n in ns if n < k]
    if small:
        raise ConfigError(f"N={small[0]} pairs cannot be split into {k} folds (each fold holds out at least one "
                          f"pair); use --pairs values >= {k} or fewer --folds")
    if epochs_per_pair is None:
        if cv is None:
            raise ConfigError("no epoch schedule: pass --epochs-per-pair E (epochs = round(E x N)) or a --preset "
                              "(actin, tubulin, caveolae, pxn)")
        epochs_per_pair = cv.epochs_per_pair
    if not (math.isfinite(float(epochs_per_pair)) and float(epochs_per_pair) > 0):
        raise ConfigError(f"--epochs-per-pair {epochs_per_pair} must be a positive number, e.g. 2")
    epochs = {n: max(1, int(round(float(epochs_per_pair) * n))) for n in ns}

    ins = [input_channels] if isinstance(input_channels, str) else list(input_channels or [])
    tgs = [target_channels] if isinstance(target_channels, str) else list(target_channels or [])
    pcfg = patch_config(preset=preset, mode=mode, input_channels=ins or None, target_channels=tgs or None,
                        patch_size=patch_size, patches_per_image=patches_per_image, augment=augment,
                        percentiles=tuple(percentiles) if percentiles is not None else None, seed=seed,
                        validation_fraction=0.0)
    if len(pcfg.input_channels) != 1 or len(pcfg.target_channels) != 1:
        raise ChannelError(f"crossval compares one input with one target channel, got {pcfg.input_channels} -> "
                           f"{pcfg.target_channels}; pass one --input-channel and one --target-channel")
    in_ch, tg_ch = pcfg.input_channels[0], pcfg.target_channels[0]
    ref_ch = reference_channel or tg_ch
    table3 = ({"steps_per_epoch": cv.steps_per_epoch, "batch_size": cv.batch_size,
               "learning_rate": cv.learning_rate, "loss": cv.loss} if cv else {})
    given = {"steps_per_epoch": steps_per_epoch, "batch_size": batch_size, "learning_rate": learning_rate,
             "loss": loss}
    explicit = {key: v for key, v in given.items() if v is not None}
    tcfg = train_config(None, preset=preset, **{**table3, **explicit},
                        unet_n_depth=unet_n_depth, unet_n_first=unet_n_first, unet_kern_size=unet_kern_size,
                        strategy=strategy, seed=seed, tensorboard=False, precision=precision)
    from l2l_scale.model.losses import check_patch_size

    check_patch_size(tcfg.loss_spec(), pcfg.patch_size)
    if pcfg.patch_size % (2**tcfg.unet_n_depth):
        raise ConfigError(f"patch size {pcfg.patch_size} is not a multiple of the U-Net grid {2**tcfg.unet_n_depth} "
                          "(2**depth); use a multiple of it or a lower --unet-depth")
    smooth_v = float(smooth) if smooth is not None else (cv.smooth if cv else 0.0)
    if not (math.isfinite(smooth_v) and smooth_v >= 0):
        raise ConfigError(f"--smooth {smooth} must be >= 0 (paper: 1.5 for STED caveolae, else 0)")

    # The dataset: one pair per image; metadata only.
    require_exists(dataset)
    refs = list_images(dataset)
    n_total = len(refs)
    if n_total < k:
        raise InputError(f"{dataset} has {n_total} image pair(s) but {k}-fold cross-validation needs at least {k}; "
                         "add pairs or use fewer --folds")
    if n_total < max(ns):
        raise InputError(f"{dataset} has {n_total} image pairs but --pairs asks for N={max(ns)}; use N <= "
                         f"{n_total} or add pairs")
    for ref in refs:
        img = open_image(ref.path)
        names = [str(c) for c in img.coords["c"].values] if "c" in img.dims else []
        for ch, what in ((in_ch, "input"), (tg_ch, "target"), (ref_ch, "reference")):
            if ch not in names:
                raise ChannelError(f"image {ref.key or ref.path} has no {what} channel {ch!r} (it has "
                                   f"{', '.join(names) or 'no channel axis'}); pass channel names every pair has")
        side = min(img.sizes["y"], img.sizes["x"])
        need = max([pcfg.patch_size] + ([int(round(pcfg.patch_size / z)) for z in pcfg.zooms] if pcfg.augment else []))
        if side < need:  # checked here too, so that it fails now and not in the first fold
            raise InputError(f"image {ref.key or ref.path} is {img.sizes['y']}x{img.sizes['x']} px, smaller than the "
                             f"{need} px a patch (or its zoomed source region) needs; use a smaller --patch-size")
        if side < 97:
            raise InputError(f"image {ref.key or ref.path} is {img.sizes['y']}x{img.sizes['x']} px; the 5-scale "
                             "MS-SSIM of a whole image needs at least 97 px per side; use larger images")

    if out_dir.exists() and not (resume or overwrite):
        raise OutputError(f"{out_dir} exists; pass --resume to finish that cross-validation or --overwrite to "
                          "start again")
    if out_dir.exists() and overwrite and not resume and not (out_dir / RUN_FILE).is_file() and any(
            out_dir.iterdir()):
        # --overwrite deletes OUT_DIR: never a folder that some other program wrote.
        raise OutputError(f"{out_dir} is not a crossval results folder (no {RUN_FILE}); --overwrite only replaces "
                          "those, choose another OUT_DIR")
    check_output(out_dir, overwrite=True, inputs=[dataset])  # overlap, lock, writable parent

    settings = {
        "dataset": str(dataset.resolve()),
        "keys": [r.key for r in refs],
        "mode": mode,
        "preset": p.name if p else None,
        "channels": {"input": in_ch, "target": tg_ch, "reference": ref_ch},
        "folds": k,
        "pairs": list(ns),
        "repeats": list(rs),
        "epochs_per_pair": float(epochs_per_pair),
        "epochs": {str(n): e for n, e in epochs.items()},
        "seed": int(seed),
        "patches": pcfg.model_dump(mode="json"),
        # The epochs are per N (above); the rest of the training settings are shared by every fold.
        "train": {key: v for key, v in tcfg.model_dump(mode="json").items() if key != "epochs"},
        "evaluate": {"percentiles": list(pcfg.percentiles), "smooth": smooth_v, "region": "image",
                     "data_range": 1.0},
        "predict": {"tile": tile},
    }
    plan = CrossvalPlan(dataset, out_dir, settings, resume=resume, overwrite=overwrite, keep_work=keep_work,
                        command=command)
    entries = [(_view_name(i, r.key), str(Path(r.path).resolve()), r.key) for i, r in enumerate(refs)]
    for n, reps in zip(ns, rs):
        for r in range(reps):
            parts = fold_assignments(n_total, n, k, seed, r)
            for f, test in enumerate(parts):
                train_idx = sorted(i for j, part in enumerate(parts) if j != f for i in part)
                fid = f"n{n:03d}-r{r:02d}-f{f:02d}"
                plan.jobs.append({
                    "id": fid, "pairs": n, "repeat": r, "fold": f, "epochs": epochs[n],
                    "train": [entries[i] for i in train_idx], "test": [entries[i] for i in test],
                    "work": str(out_dir.resolve() / WORK_DIR / fid),
                    "result": str(out_dir.resolve() / FOLDS_DIR / f"{fid}.json"),
                    "patches": settings["patches"], "train_config": settings["train"],
                    "channels": settings["channels"], "evaluate": settings["evaluate"], "tile": tile,
                    "keep_work": bool(keep_work),
                })
    return plan


# ----------------------------------------------------------------------------------------------- the driver


def _check_run_file(plan: CrossvalPlan) -> None:
    run_file = plan.out_dir / RUN_FILE
    if plan.resume and run_file.exists():
        previous = json.loads(run_file.read_text())
        old, new = previous.get("settings", {}), plan.settings
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            raise OutputError(f"{plan.out_dir}: the earlier run used different {', '.join(changed)}; rerun with the "
                              "same options, or with --overwrite to start again")
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(run_file, {"l2l_scale_crossval_run": CROSSVAL_VERSION, "settings": plan.settings,
                                  "folds": [{"id": j["id"], "train_keys": [e[2] for e in j["train"]],
                                             "test_keys": [e[2] for e in j["test"]]} for j in plan.jobs]})


def _read_fold(job: dict) -> dict:
    path = Path(job["result"])
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise InputError(f"{path}: unreadable fold result; delete it and rerun with --resume") from None
    if data.get("test_keys") != [e[2] for e in job["test"]] or data.get("train_keys") != [e[2] for e in job["train"]]:
        raise OutputError(f"{path} belongs to a different fold plan; delete it and rerun with --resume, or rerun "
                          "with --overwrite")
    return data


def format_crossval_table(summary: dict) -> str:
    """A plain-text table of a ``crossval.json`` summary: per N the mean +- s.d. of both relative changes."""
    head = f"{'N':>5}  {'repeats x folds':>15}  {'epochs':>6}  {'dNRMSE mean +- sd':>20}  {'dSSIM5 mean +- sd':>20}"
    lines = [head]
    for n, e in summary["pairs"].items():
        cells = []
        for m in ("nrmse_rel_change", "ssim5_rel_change"):
            cells.append(f"{_fmt(e['mean'][m])} +- {_fmt(e['sd'][m], signed=False)}")
        lines.append(f"{n:>5}  {str(e['repeats']) + ' x ' + str(e['folds']):>15}  {e['epochs']:>6}  "
                     f"{cells[0]:>20}  {cells[1]:>20}")
    lines.append("(relative change of input -> restoration vs the reference label; NRMSE: lower is better, "
                 "5-scale MS-SSIM: higher is better)")
    return "\n".join(lines)


def run_crossval(plan: CrossvalPlan) -> dict:
    """Run (or finish) a planned cross-validation and write ``crossval.json`` and ``crossval.csv``.

    Returns
    -------
    dict
        ``summary`` (the ``crossval.json`` content), ``trained`` and ``skipped`` (fold ids), ``path``
        (``crossval.json``) and ``csv``.
    """
    from l2l_scale.io import lock

    out = plan.out_dir
    with lock.OutputLock(out):
        if plan.overwrite and out.exists() and not plan.resume:
            shutil.rmtree(out)
        _check_run_file(plan)
        (out / FOLDS_DIR).mkdir(exist_ok=True)
        done = [j for j in plan.jobs if Path(j["result"]).is_file()]
        pending = [j for j in plan.jobs if not Path(j["result"]).is_file()]
        if done:
            _say(f"{len(done)} of {plan.n_folds_total} folds already finished; running the other {len(pending)}")
        if pending:
            _run_jobs(pending)
        results = [_read_fold(j) for j in plan.jobs]
        summary = _summarise(plan, results)
        _write_json_atomic(out / SUMMARY_FILE, summary)
        _write_csv(results, out / CSV_FILE)
        work = out / WORK_DIR
        if work.is_dir() and not any(work.iterdir()):
            work.rmdir()
    return {"summary": summary, "trained": [j["id"] for j in pending], "skipped": [j["id"] for j in done],
            "path": out / SUMMARY_FILE, "csv": out / CSV_FILE}


def crossval(dataset: str | Path, out_dir: str | Path, **options: Any) -> dict:
    """Repeated k-fold cross-validation of L2L (or N2N) training, split by image pair (paper Fig. 5, Table 3).

    Parameters
    ----------
    dataset : path
        OME-Zarr HCS plate or folder of images; every image (field) is one input/target pair.
    out_dir : path
        Results folder (see the module notes).
    input_channels, target_channels : str or list of one str
        The input label and the training target (``mode="n2n"``: default ``<input>-repeat``). A ``preset`` sets
        the paper's.
    reference_channel : str, optional
        The label the metrics compare with (default: the target channel).
    mode : {"l2l", "n2n"}
    preset : {"actin", "tubulin", "caveolae", "pxn"}, optional
        The paper's channels, normalisation, augmentation and Table 3 settings (see the module notes).
    folds : int
        k (default 8, or the preset's).
    pairs, repeats : sequence of int or "8,16,32,64"
        N values and the repeats of each (same length; default 8,16,32,64 and 10,5,3,2, or the preset's).
    epochs_per_pair : float
        ``epochs = round(epochs_per_pair * N)``; required without a preset.
    steps_per_epoch, batch_size, learning_rate, loss, unet_n_depth, unet_n_first, unet_kern_size, strategy
        Training settings (:class:`l2l_scale.config.TrainConfig`); the preset's Table 3 values by default.
    patch_size, patches_per_image, augment, percentiles
        Patch settings (:class:`l2l_scale.config.PatchConfig`); the percentiles also normalise the metrics.
    smooth : float, optional
        Gaussian sigma applied to every normalised image before the metrics (caveolae preset: 1.5; else 0).
    tile : int, optional
        Prediction tile side (see :func:`l2l_scale.predict.predict`).
    precision : {"fp32", "bf16", "fp16"}, optional
        Compute precision of each fold's training and prediction (default fp32).
    seed : int
        Seeds the pair draws ``(seed, N, repeat)``, the patch sampling and the training.
    resume : bool
        Finish an interrupted run: folds with a result in ``OUT_DIR/folds`` are not retrained.
    overwrite : bool
        Delete an existing ``out_dir`` first.
    keep_work : bool
        Keep every fold's patch store, model and restorations in ``OUT_DIR/work/ID``.
    command : str, optional
        The command line recorded in ``crossval.json``'s provenance (the CLI passes its own; default: this
        process's command line).

    Returns
    -------
    dict
        See :func:`run_crossval`.

    Raises
    ------
    ConfigError, InputError, ChannelError, OutputError
        See :func:`plan_crossval`; errors of a fold (e.g. a training pair without foreground) propagate, and the
        folds finished before are kept for ``resume``.
    """
    return run_crossval(plan_crossval(dataset, out_dir, **options))


