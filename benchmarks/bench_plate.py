"""Benchmark what a plate of many fields costs against one image of the same pixels, in one run on this machine.

    python benchmarks/bench_plate.py [--cases 256x256,64x512,16x1024] [--image 4096] [--json OUT.json]
    python benchmarks/bench_plate.py --fields 1536 --size 2048 --dry-run [--json OUT.json]

Data: one simulated actin image (the input label, uint16) of ``--image``^2 pixels, and for every case ``FxS`` an
HCS plate of F fields of S^2 pixels cut from that same image (4 fields per well, 24 columns per row), so plate and
image hold the same pixels. Model: a tiny CARE net (depth 2, kernel 3, 8 first filters, random weights), so that
per-field overheads show rather than convolutions.

Each case runs in its own subprocess on LocalClusters (for predict the CLI's default: one worker process, a thread
per core; the scheduler runs in the client process), after a warm-up predict on a small image (cluster start-up
and the worker's model load are excluded, as a facility run amortises them). Timed, best of ``--repeat``:

- stats:   ``dataset_stats`` (exact percentiles of every field, scope image) on the cluster ``l2l-scale stats``
  starts (the LocalCluster default: here a worker process per core), and again on the predict cluster
  (``stats_on_predict_cluster_*``: one process of a thread per core, whose threads share one GIL);
- predict: ``predict`` zarr -> zarr, including its statistics and the pyramid.

Reported per case: both wall times and their ratio to the image's (``*_plate_over_image``: 1.0 means a field
costs only its pixels), client and total peak RSS (the client's own peak includes the in-process scheduler; total
sums the process tree), the files of the output plus the completion records present just before the output is
finished (``files_per_field``), the zarr chunks per field over all pyramid levels (``chunks_per_field``), and the
tasks the scheduler ran for one predict (``scheduler_tasks``).

``--dry-run`` builds, without computing, the whole plan for a plate of ``--fields`` fields of ``--size``^2 uint16
pixels: the plate is metadata only (no chunk is written, zarr reads them as the fill value) and the percentiles
come from a stats JSON, so only the plan is measured: its build time (``plan_s``), task count and client RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's l2l_scale, not an installed one
from _common import emit, random_care_model  # noqa: E402
from _procmem import run_measured  # noqa: E402

TARGETS = {"predict_plate_over_image": {"256x256": 1.25, "64x512": 1.10},
           "stats_plate_over_image": {"256x256": 1.25, "64x512": 1.10},
           "files_per_field_minus_chunks": 10, "dry_run_plan_s": 60.0, "dry_run_client_rss_gb": 2.0}
FIELDS_PER_WELL = 4
COLUMNS = 24
CHANNEL = "AC-15"


def _field_keys(n: int) -> list[str]:
    keys = []
    for i in range(n):
        well, f = divmod(i, FIELDS_PER_WELL)
        r, c = divmod(well, COLUMNS)
        keys.append(f"{chr(ord('A') + r % 26) * (1 + r // 26)}/{c + 1}/{f}")
    return keys


def _make_image(path: Path, size: int) -> Path:
    import dask

    from l2l_scale.io import write_image
    from l2l_scale.synthetic import simulate

    with dask.config.set(scheduler="threads"):
        write_image(simulate("actin", size, seed=size).sel(c=[CHANNEL]), path)
    return path


def _make_plate(path: Path, image: Path, fields: int, size: int) -> Path:
    """A plate of ``fields`` fields of ``size``^2 pixels cut from ``image`` (row-major, non-overlapping)."""
    import dask

    from l2l_scale.io import open_image, write_plate

    img = open_image(image)
    per_row = img.sizes["x"] // size
    parts = {}
    for i, key in enumerate(_field_keys(fields)):
        y, x = divmod(i, per_row)
        parts[key] = img.isel(y=slice(y * size, (y + 1) * size), x=slice(x * size, (x + 1) * size))
    with dask.config.set(scheduler="threads"):
        write_plate(parts, path, label="making plate")
    return path


def _make_empty_plate(path: Path, fields: int, size: int) -> Path:
    """Plate metadata and empty arrays only: what the planner reads, without terabytes of pixels."""
    import zarr

    from l2l_scale.io.write import create_image_group, default_chunks, split_field_key, write_plate_layout

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    layout: dict[tuple[str, str], list[str]] = {}
    keys = _field_keys(fields)
    for key in keys:
        r, c, f = split_field_key(key)
        layout.setdefault((r, c), []).append(f)
    write_plate_layout(root, layout, name=path.stem)
    dims, shape = ("c", "y", "x"), (1, size, size)
    for key in keys:
        group = zarr.open_group(str(path / key), mode="w", zarr_format=3)
        create_image_group(group, dims, shape, np.dtype("uint16"), default_chunks(shape, dims), {"y": 1.0, "x": 1.0},
                           [CHANNEL], name=key.replace("/", "-"), attrs_extra=None)
    return path


def _count_files(path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def _count_chunks(path: Path) -> int:
    """Chunk files of every zarr v3 array under ``path`` (the default chunk key encoding puts them under c/)."""
    return sum(len(files) for root, _, files in os.walk(path) if "c" in Path(root).relative_to(path).parts)


def _client_rss_gb() -> float:
    """Peak resident memory of this process (the client, with LocalCluster's in-process scheduler)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak * (1 if sys.platform == "darwin" else 1024) / 1e9, 3)


COUNTER = "l2l-bench-task-counter"


def _task_counter():
    """A scheduler plugin counting the tasks that finished (reached memory) while it was registered."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class TaskCounter(SchedulerPlugin):
        name = COUNTER

        def __init__(self):
            self.keys: set = set()

        def transition(self, key, start, finish, *args, **kwargs):
            if finish == "memory":
                self.keys.add(key)

    return TaskCounter()


def _child_case(model: Path, image: Path, plate: Path, warm: Path, out: Path, repeat: int) -> dict:
    """Stats and predict of ``image`` and ``plate``, interleaved (image, plate, image, plate, ...) so that a change
    in the machine's load during the run affects both alike; the best of ``repeat`` runs of each is kept."""
    import shutil

    from l2l_scale.cluster import config_from_options, dask_client
    from l2l_scale.io.output import PROGRESS_DIR
    from l2l_scale.io.read import list_images
    from l2l_scale.predict import predict
    from l2l_scale.preprocess.normalize import dataset_stats

    rmtree = shutil.rmtree
    res = {name: {"stats": [], "stats_on_predict_cluster": [], "predict": [], "records": 0}
           for name in ("image", "plate")}

    def counting_rmtree(path, *args, **kwargs):
        # atomic_output removes the completion records just before the final rename: count them there.
        if Path(path).name == PROGRESS_DIR and Path(path).exists():
            res[current]["records"] = _count_files(Path(path))
        return rmtree(path, *args, **kwargs)

    def time_stats(key: str) -> None:
        dataset_stats(warm, q=(2.0, 99.8))  # the workers' first use (kernel load) is not timed
        for i in range(repeat):
            for current, data in (("image", image), ("plate", plate)):
                t0 = time.perf_counter()
                dataset_stats(data, q=(2.0, 99.8))
                res[current][key].append(time.perf_counter() - t0)

    clusters = {}
    with dask_client(config_from_options()) as client:  # what ``l2l-scale stats`` runs on
        clusters["stats"] = sorted(client.nthreads().values())
        time_stats("stats")
    with dask_client(config_from_options(model_step=True)) as client:
        clusters["predict"] = sorted(client.nthreads().values())
        predict(model, warm, out / "warm_out.zarr", channels=[CHANNEL], overwrite=True)
        time_stats("stats_on_predict_cluster")
        for i in range(repeat):
            for current, data in (("image", image), ("plate", plate)):
                target = out / f"out_{current}.zarr"
                rmtree(target, ignore_errors=True)
                last = i == repeat - 1
                if last:
                    counter = _task_counter()
                    client.register_plugin(counter, name=f"{COUNTER}")
                    shutil.rmtree = counting_rmtree
                t0 = time.perf_counter()
                predict(model, data, target, channels=[CHANNEL])
                res[current]["predict"].append(time.perf_counter() - t0)
                shutil.rmtree = rmtree
                if last:
                    res[current]["tasks"] = client.run_on_scheduler(
                        lambda dask_scheduler: len(dask_scheduler.plugins[COUNTER].keys))
                    client.unregister_scheduler_plugin(COUNTER)
    report = {}
    for current, data in (("image", image), ("plate", plate)):
        r, target = res[current], out / f"out_{current}.zarr"
        n, files = len(list_images(data)), _count_files(target)
        report[current] = {
            "fields": n, "stats_s": round(min(r["stats"]), 3), "predict_s": round(min(r["predict"]), 3),
            "stats_on_predict_cluster_s": round(min(r["stats_on_predict_cluster"]), 3),
            "stats_all_s": [round(v, 3) for v in r["stats"]], "predict_all_s": [round(v, 3) for v in r["predict"]],
            "output_files": files, "record_files": r["records"], "files_per_field": round((files + r["records"]) / n, 3),
            "chunks_per_field": round(_count_chunks(target) / n, 3), "scheduler_tasks": r["tasks"]}
    report["client_rss_gb"] = _client_rss_gb()
    report["worker_threads"] = clusters
    return report


def _child_dry_run(model: Path, plate: Path, stats: Path, out: Path) -> dict:
    import dask

    from l2l_scale.predict import predict

    t0 = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        plan = predict(model, plate, out, channels=[CHANNEL], norm_stats=str(stats), dry_run=True)
    plan_s = time.perf_counter() - t0
    return {"plan_s": round(plan_s, 3), "tasks": plan["tasks"], "blocks": plan["blocks"], "images": plan["images"],
            "client_rss_gb": _client_rss_gb()}


def _run_child(args: list[str]) -> dict:
    r = run_measured([sys.executable, __file__, "--child", *args])
    if r["returncode"] != 0:
        return {"error": f"child exited with {r['returncode']}: {r['stderr'].strip().splitlines()[-3:]}"}
    result = json.loads(r["stdout"].strip().splitlines()[-1])
    result["total_rss_gb"] = round(r["peak_rss"] / 1e9, 3)
    result["child_s"] = round(r["seconds"], 3)
    return result


def _dry_run(args, work: Path, model: Path) -> dict:
    """Plan ``--fields`` and, for the memory comparison, 16 fields of ``--size``^2 (each in its own process)."""
    out = {}
    for fields in (16, args.fields):
        plate = work / f"empty_{fields}x{args.size}.zarr"
        if not (plate / "zarr.json").exists():
            _make_empty_plate(plate, fields, args.size)
        stats = work / f"empty_{fields}x{args.size}.stats.json"
        images = {key: {CHANNEL: {"lo": 100.0, "hi": 1000.0}} for key in _field_keys(fields)}
        stats.write_text(json.dumps({"l2l_scale_stats": 1, "percentiles": [2.0, 99.8], "scope": "image",
                                     "images": images}))
        out[fields] = _run_child(["dry", str(model), str(plate), str(stats), str(work / "dry_out.zarr")])
    res = {**out[args.fields], "fields": args.fields, "size": args.size, "at_16_fields": out[16]}
    if "plan_s" in res and "client_rss_gb" in out[16]:
        res["client_rss_over_16_fields"] = round(res["client_rss_gb"] / out[16]["client_rss_gb"], 3)
        res["meets_targets"] = {"plan_s": res["plan_s"] < TARGETS["dry_run_plan_s"],
                                "client_rss_gb": res["client_rss_gb"] < TARGETS["dry_run_client_rss_gb"],
                                "client_rss_over_16_fields": res["client_rss_over_16_fields"] <= 1.5}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="256x256,64x512,16x1024", help="plates as FIELDSxSIDE, comma-separated")
    ap.add_argument("--image", type=int, default=4096, help="side of the reference image (F x S^2 = image^2)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per measurement (the best is reported)")
    ap.add_argument("--dry-run", action="store_true", help="only plan a plate of --fields x --size^2, no compute")
    ap.add_argument("--fields", type=int, default=1536)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--json", help="also write the JSON here")
    ap.add_argument("--workdir", help="keep data here instead of a temporary folder")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "dry":
            res = _child_dry_run(*map(Path, rest))
        else:
            res = _child_case(*map(Path, rest[:5]), int(rest[5]))
        print(json.dumps(res))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_plate_"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "config.json").exists():
        random_care_model(model, kern_size=3, n_first=8, channel=CHANNEL)
    report = {"machine": {"cores": os.cpu_count(), "memory_gb": round(__import__("psutil").virtual_memory().total / 1e9, 1)},
              "model": {"unet_n_depth": 2, "unet_kern_size": 3, "unet_n_first": 8, "weights": "random"},
              "targets": TARGETS}
    if args.dry_run:
        report["dry_run"] = _dry_run(args, work, model)
    else:
        warm = work / "warm.zarr"
        if not warm.exists():
            _make_image(warm, 256)
        image = work / f"image_{args.image}.zarr"
        if not image.exists():
            _make_image(image, args.image)
        report["cases"] = {}
        meets = {}
        for case in [c for c in args.cases.split(",") if c]:
            fields, side = (int(v) for v in case.split("x"))
            if fields * side * side != args.image ** 2:
                raise SystemExit(f"case {case}: {fields} x {side}^2 is not {args.image}^2 pixels")
            plate = work / f"plate_{case}.zarr"
            if not plate.exists():
                _make_plate(plate, image, fields, side)
            out = work / f"out_{case}"
            out.mkdir(exist_ok=True)
            both = _run_child(["case", str(model), str(image), str(plate), str(warm), str(out), str(args.repeat)])
            if "plate" not in both:
                report["cases"][case] = both
                continue
            res, ref = both["plate"], both["image"]
            res.update(client_rss_gb=both["client_rss_gb"], total_rss_gb=both["total_rss_gb"], image=ref)
            report.setdefault("image", {"size": args.image, **ref})
            res["predict_plate_over_image"] = round(res["predict_s"] / ref["predict_s"], 3)
            res["stats_plate_over_image"] = round(res["stats_s"] / ref["stats_s"], 3)
            res["stats_on_predict_cluster_plate_over_image"] = round(
                res["stats_on_predict_cluster_s"] / ref["stats_on_predict_cluster_s"], 3)
            res["worker_threads"] = both["worker_threads"]
            res["files_per_field_minus_chunks"] = round(res["files_per_field"] - res["chunks_per_field"], 3)
            m = {"files_per_field": res["files_per_field_minus_chunks"] <= TARGETS["files_per_field_minus_chunks"],
                 "image_files": ref["files_per_field"] - ref["chunks_per_field"] <= TARGETS["files_per_field_minus_chunks"]}
            for key in ("predict_plate_over_image", "stats_plate_over_image"):
                if case in TARGETS[key]:
                    m[key] = res[key] <= TARGETS[key][case]
            res["meets_targets"] = m
            meets[case] = all(m.values())
            report["cases"][case] = res
            print(json.dumps({case: res}), file=sys.stderr, flush=True)
        report["meets_targets"] = meets
    emit(report, args.json)


if __name__ == "__main__":
    main()
