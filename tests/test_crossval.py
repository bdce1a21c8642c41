"""Cross-validation by image pair (``l2l-scale crossval``): disjoint folds, the ``crossval.json`` schema and values,
resuming (only missing folds retrain, same result), the Dask-worker path, and one-line CLI errors.

One small run (6 simulated 128 px pairs, N = 3 and 4, 2 folds, a depth-1 U-Net with 8 filters trained for a few
steps) is shared by the tests; it runs in this process without a cluster.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from l2l_scale.errors import ChannelError, ConfigError, InputError, OutputError
from l2l_scale.evaluate import crossval as cv
from l2l_scale.evaluate.report import load_crossval

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[1]
PAIRS, REPEATS, FOLDS = "3,4", "2,1", 2
TINY = dict(input_channels="AC-15", target_channels="phalloidin", folds=FOLDS, epochs_per_pair=0.5,
            steps_per_epoch=3, batch_size=8, loss="l1", unet_n_depth=1, unet_n_first=8, unet_kern_size=3,
            patch_size=32, patches_per_image=16, strategy="none")


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    import dask

    from l2l_scale.synthetic import write_simulation

    with dask.config.set(scheduler="threads"):
        return write_simulation(tmp_path_factory.mktemp("cv") / "plate.zarr", structure="actin", size=128, fields=6,
                                seed=0, chunks=128)


@pytest.fixture(scope="module")
def run(plate, tmp_path_factory):
    out = tmp_path_factory.mktemp("cvrun") / "cv"
    result = cv.crossval(plate, out, pairs=PAIRS, repeats=REPEATS, **TINY)
    return out, result


def _folds(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "folds").glob("*.json"))}


def _stable(fold: dict) -> dict:
    return {k: v for k, v in fold.items() if k != "seconds"}


# --------------------------------------------------------------------------------------------------- folds


@pytest.mark.parametrize("n_total,n,k", [(6, 3, 2), (68, 8, 8), (68, 64, 8), (51, 50, 10), (77, 30, 10)])
def test_folds_never_share_a_pair(n_total, n, k):
    for r in range(3):
        parts = cv.fold_assignments(n_total, n, k, seed=0, repeat=r)
        flat = [i for p in parts for i in p]
        assert len(parts) == k and len(flat) == n == len(set(flat))  # disjoint, N pairs in all
        assert all(0 <= i < n_total for i in flat)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert parts == cv.fold_assignments(n_total, n, k, seed=0, repeat=r)  # seeded by (seed, N, repeat)
    draws = {tuple(sorted(i for p in cv.fold_assignments(n_total, n, k, 0, r) for i in p)) for r in range(5)}
    assert len(draws) > 1 or n == n_total


def test_plan_splits_by_pair(plate, tmp_path):
    plan = cv.plan_crossval(plate, tmp_path / "cv", pairs=PAIRS, repeats=REPEATS, **TINY)
    assert not (tmp_path / "cv").exists()  # planning writes nothing
    assert [j["id"] for j in plan.jobs] == ["n003-r00-f00", "n003-r00-f01", "n003-r01-f00", "n003-r01-f01",
                                            "n004-r00-f00", "n004-r00-f01"]
    by_cv: dict[tuple, list] = {}
    for j in plan.jobs:
        train, test = {e[2] for e in j["train"]}, {e[2] for e in j["test"]}
        assert test and train and not train & test
        by_cv.setdefault((j["pairs"], j["repeat"]), []).append((train, test))
        assert j["epochs"] == max(1, round(0.5 * j["pairs"]))
    for (n, _), folds in by_cv.items():
        tests = [t for _, t in folds]
        assert sum(map(len, tests)) == n == len(set().union(*tests))  # the folds partition the N pairs
        for train, test in folds:
            assert train == set().union(*tests) - test  # training pairs: exactly the other folds'
    # The preset fills in the paper's Table 3 (8 folds, N = 8..64, epochs linear in N).
    with pytest.raises(InputError, match="6 image pair.*8-fold"):
        cv.plan_crossval(plate, tmp_path / "p", preset="actin")
    with pytest.raises(InputError, match="smaller than the 256 px"):  # 128 px patches zoomed by 0.5
        cv.plan_crossval(plate, tmp_path / "p", preset="actin", folds=2, pairs="4", repeats="1")
    s = cv.plan_crossval(plate, tmp_path / "p", preset="actin", folds=2, pairs="4", repeats="1",
                         patch_size=48).settings
    assert (s["train"]["learning_rate"], s["train"]["batch_size"], s["train"]["steps_per_epoch"],
            s["train"]["loss"]) == (5e-4, 32, 150, "ms-ssim3")
    assert s["epochs"] == {"4": 8} and s["channels"] == {"input": "AC-15", "target": "phalloidin",
                                                       "reference": "phalloidin"}  # 1.875 epochs per pair
    assert s["patches"]["augment"] and s["patches"]["validation_fraction"] == 0.0
    assert cv.CROSSVAL_PRESETS["tubulin"].epochs_per_pair == 2.0


# ------------------------------------------------------------------------------------------ schema, values


def test_crossval_json_schema_and_values(run):
    out, result = run
    assert sorted(result["trained"]) == sorted(_folds(out)) and result["skipped"] == []
    summary = json.loads((out / "crossval.json").read_text())
    assert summary["l2l_scale_crossval"] == 1 and summary["folds"] == FOLDS and summary["dataset"] == "plate"
    assert set(summary["pairs"]) == {"3", "4"} and "provenance" in summary
    folds = _folds(out)
    rows = list(csv.DictReader((out / "crossval.csv").open()))
    assert len(rows) == len(folds) == 6
    for n, reps in ((3, 2), (4, 1)):
        entry = summary["pairs"][str(n)]
        assert entry["repeats"] == reps and entry["epochs"] == 2
        ids = [f"n{n:03d}-r{r:02d}-f{f:02d}" for r in range(reps) for f in range(FOLDS)]  # repeat-major
        for metric, name in (("nrmse", "nrmse_rel_change"), ("ms_ssim_5", "ssim5_rel_change")):
            expected = []
            for fid in ids:
                per_pair = folds[fid]["per_pair"]
                m_in = np.mean([p["input"][metric] for p in per_pair])
                m_out = np.mean([p["restoration"][metric] for p in per_pair])
                expected.append((m_out - m_in) / m_in)
                row = next(r for r in rows if r["id"] == fid)
                assert float(row[name]) == pytest.approx(expected[-1], rel=1e-12)
            assert entry[name] == pytest.approx(expected, rel=1e-12)
            assert entry["mean"][name] == pytest.approx(np.mean(expected), rel=1e-12)
            assert entry["sd"][name] == pytest.approx(np.std(expected, ddof=1), rel=1e-12)
            assert entry["repeat_mean"][name] == pytest.approx(
                [np.mean(expected[r * FOLDS:(r + 1) * FOLDS]) for r in range(reps)], rel=1e-12)
    loaded = load_crossval(out / "crossval.json")  # what the report reads
    assert list(loaded["pairs"]) == [3, 4] and loaded["pairs"][3]["nrmse_rel_change"].shape == (4,)


def test_per_pair_metrics_are_whole_image_percentile_normalised(run, plate):
    """A held-out pair's input row equals Table 1's metrics of its own percentile-normalised images, and does not
    depend on the fold it was tested in."""
    from l2l_scale.evaluate.metrics import table1_metrics
    from l2l_scale.io.read import open_image

    out, _ = run
    rows: dict[str, list] = {}
    for fold in _folds(out).values():
        assert not set(fold["train_keys"]) & set(fold["test_keys"])
        for p in fold["per_pair"]:
            rows.setdefault(p["key"], []).append(p)
            assert p["restoration"] != p["input"]
    key, seen = max(rows.items(), key=lambda kv: len(kv[1]))
    assert all(p["input"] == seen[0]["input"] for p in seen)
    img = open_image(plate, field=key)

    def norm(ch):
        x = img.sel(c=ch).values.astype(np.float64)
        lo, hi = np.percentile(x, (2.0, 99.8))  # PatchConfig's default percentiles train and evaluate
        return ((x - lo) / (hi - lo + 1e-20)).astype(np.float32)

    ref = table1_metrics(norm("phalloidin"), norm("AC-15"), data_range=1.0)
    for m in ("nrmse", "ms_ssim_5", "psnr"):
        assert seen[0]["input"][m] == pytest.approx(ref[m], rel=1e-5)


# ------------------------------------------------------------------------------------------------- resuming


def test_resume_retrains_only_the_missing_fold(run, plate, monkeypatch):
    import l2l_scale.train as train_mod

    out, _ = run
    before = {k: _stable(v) for k, v in _folds(out).items()}
    pairs_before = json.loads((out / "crossval.json").read_text())["pairs"]
    # A rerun without --resume refuses; --resume with other settings names them.
    with pytest.raises(OutputError, match="--resume"):
        cv.crossval(plate, out, pairs=PAIRS, repeats=REPEATS, **TINY)
    with pytest.raises(OutputError, match="epochs, epochs_per_pair"):
        cv.crossval(plate, out, pairs=PAIRS, repeats=REPEATS, resume=True, **{**TINY, "epochs_per_pair": 1.0})

    victim = "n003-r01-f00"
    (out / "folds" / f"{victim}.json").unlink()
    stale = out / "work" / victim
    stale.mkdir(parents=True)
    (stale / "half-written").write_text("left by a crash")  # an interrupted fold is redone from scratch
    calls = []
    real_train = train_mod.train
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: calls.append(a[1]) or real_train(*a, **k))

    result = cv.crossval(plate, out, pairs=PAIRS, repeats=REPEATS, resume=True, **TINY)
    assert result["trained"] == [victim] and len(result["skipped"]) == 5
    assert len(calls) == 1 and victim in str(calls[0])
    assert {k: _stable(v) for k, v in _folds(out).items()} == before  # bit-identical metrics and history
    assert json.loads((out / "crossval.json").read_text())["pairs"] == pairs_before
    assert not (out / "work").exists()

    calls.clear()  # a finished run resumes to the same summary without training
    assert cv.crossval(plate, out, pairs=PAIRS, repeats=REPEATS, resume=True, **TINY)["trained"] == []
    assert not calls


def test_folds_on_a_dask_worker_equal_in_process(run, plate, tmp_path):
    """On a worker each fold runs in a child process; its results equal the in-process folds bit for bit."""
    from distributed import Client, LocalCluster

    out, _ = run
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster):
        result = cv.crossval(plate, tmp_path / "cv", pairs="4", repeats="1", **TINY)
    assert result["trained"] == ["n004-r00-f00", "n004-r00-f01"]
    ours, theirs = _folds(tmp_path / "cv"), _folds(out)
    for fid in result["trained"]:
        assert _stable(ours[fid]) == _stable(theirs[fid])


# --------------------------------------------------------------------------------------------------- errors


def test_option_errors(plate, tmp_path):
    with pytest.raises(ChannelError, match="no reference channel 'truth2'"):
        cv.plan_crossval(plate, tmp_path / "x", pairs="3", repeats="1", reference_channel="truth2", **TINY)
    with pytest.raises(ConfigError, match="N=3 pairs cannot be split into 4 folds"):
        cv.plan_crossval(plate, tmp_path / "x", pairs="3", repeats="1", **{**TINY, "folds": 4})
    with pytest.raises(ConfigError, match="--epochs-per-pair"):
        cv.plan_crossval(plate, tmp_path / "x", pairs="3", repeats="1", **{**TINY, "epochs_per_pair": None})
    with pytest.raises(ConfigError, match="no cross-validation settings"):
        cv.plan_crossval(plate, tmp_path / "x", preset="separation")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "l2l_scale.cli", "crossval", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


@pytest.mark.parametrize("extra,words", [
    (["--folds", "8", "--pairs", "8", "--repeats", "1"], ["6 image pair(s)", "8-fold", "at least 8"]),
    (["--folds", "2", "--pairs", "4,8", "--repeats", "1,1"], ["6 image pairs", "N=8", "N <= 6"]),
    (["--folds", "2", "--pairs", "3,4", "--repeats", "2,1,1"], ["--pairs has 2 values", "--repeats has 3"]),
])
def test_cli_errors_are_one_line(plate, tmp_path, extra, words):
    res = _cli(plate, tmp_path / "out", "--input-channel", "AC-15", "--target-channel", "phalloidin",
               "--epochs-per-pair", "1", *extra)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("l2l-scale crossval: error:"), res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # nothing written, no cluster started


def test_cli_prints_the_table(plate, tmp_path):
    res = _cli(plate, tmp_path / "cv", "--input-channel", "AC-15", "--target-channel", "phalloidin", "--folds", "2",
               "--pairs", "2", "--repeats", "1", "--epochs-per-pair", "1", "--steps-per-epoch", "2", "--batch-size",
               "8", "--loss", "l1", "--unet-depth", "1", "--unet-n-first", "8", "--unet-kern-size", "3",
               "--patch-size", "32", "--patches-per-image", "8", "--strategy", "none", "--scheduler", "threads")
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()  # only the summary on stdout; the folds' chatter goes to stderr
    assert out[0].split()[:3] == ["N", "repeats", "x"] and out[1].split()[:5] == ["2", "1", "x", "2", "2"]
    assert out[-1].startswith("trained 2 of 2 folds (0 were already finished); wrote ")
    summary = json.loads((tmp_path / "cv" / "crossval.json").read_text())
    assert len(summary["pairs"]["2"]["nrmse_rel_change"]) == 2
