"""Benchmark: ``register``, ``contrast`` and ``baseline --preset actin`` end to end on a large simulated pair.

The issue's Done-when: on a simulated 8192^2 actin pair with drift (``simulate --n2n --drift 3.4,-2.2``), run the
three commands on a LocalCluster (the CLI default) and report wall time and peak memory. Each command runs as
a subprocess under ``/usr/bin/time -v`` (maximum RSS of the CLI process itself, i.e. the client) while this
script samples the summed RSS of the whole process tree (client + scheduler + worker processes) with psutil.

Usage::

    python benchmarks/bench_preprocess.py [--size 8192] [--chunk 1024] [--workdir DIR] [--json OUT]
        [--steps register,contrast,gaussian,rolling-ball,tophat,clahe] [--keep]

Prints one JSON object: per step the wall time (s), the client's max RSS and the tree's peak RSS (MB), and the
estimated shift against the simulated drift. The image is written once (skipped if it exists in --workdir).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's l2l_scale, not an installed one
from _procmem import run_measured  # noqa: E402

DRIFT = (3.4, -2.2)


def _write_input(path: Path, size: int, chunk: int) -> float:
    from l2l_scale.cluster import config_from_options, dask_client
    from l2l_scale.io.write import write_image
    from l2l_scale.synthetic import simulate

    t0 = time.perf_counter()
    with dask_client(config_from_options()):
        write_image(simulate("actin", size, n2n=True, drift=DRIFT, chunks=chunk), path, chunks=chunk,
                    label="writing simulated input")
    return time.perf_counter() - t0


def _run(args: list[str]) -> dict:
    """Run one CLI command under /usr/bin/time -v; sample the process tree's RSS every 0.2 s."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "l2l_scale.cli", *args]
    r = run_measured(cmd, interval=0.2)
    out, err, wall, peak, rc = r["stdout"], r["stderr"], r["seconds"], r["peak_rss"], r["returncode"]
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    lines = [ln for ln in err.splitlines() if ln.strip() and "━" not in ln and not ln.startswith("\t")]
    if rc != 0:
        raise SystemExit(f"{' '.join(args)} failed ({rc}):\n" + "\n".join(lines[-5:]))
    return {"wall_s": round(wall, 1), "client_max_rss_mb": round(int(m.group(1)) / 1024, 1) if m else None,
            "tree_peak_rss_mb": round(peak / 2**20, 1), "stdout": out.strip().splitlines()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--workdir", help="where the input and outputs go (default: a temporary folder)")
    parser.add_argument("--steps", default="register,contrast,gaussian,rolling-ball,tophat,clahe")
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--keep", action="store_true", help="keep the outputs")
    opts = parser.parse_args(argv)

    work = Path(opts.workdir or tempfile.mkdtemp(prefix="l2l-bench-preprocess-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"actin-{opts.size}.zarr"
    result: dict = {"size": opts.size, "chunk": opts.chunk, "drift": list(DRIFT), "cpus": os.cpu_count(),
                    "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "steps": {}}
    if not src.exists():
        result["write_input_s"] = round(_write_input(src, opts.size, opts.chunk), 1)
    result["input_mb_on_disk"] = round(sum(f.stat().st_size for f in src.rglob("*") if f.is_file()) / 2**20, 1)
    steps = [s.strip() for s in opts.steps.split(",") if s.strip()]
    for step in steps:
        out = work / f"{step}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        load = os.getloadavg()[0]
        if step == "register":
            r = _run(["register", str(src), str(out), "--reference", "AC-15", "--moving", "AC-15-repeat"])
            shift = [float(v) for v in re.findall(r"d[yx]=([-+][\d.]+)", " ".join(r["stdout"]))]
            r["shift"] = shift
            r["error_px"] = [round(abs(s + d), 3) for s, d in zip(shift, DRIFT)]
        elif step == "contrast":
            r = _run(["contrast", str(src), "--channels", "AC-15,phalloidin"])
        else:
            r = _run(["baseline", step, str(src), str(out), "--channel", "AC-15", "--preset", "actin"])
        r["load_avg_before"] = round(load, 2)
        result["steps"][step] = r
        print(json.dumps({step: r}), file=sys.stderr, flush=True)
        if not opts.keep:
            shutil.rmtree(out, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if opts.json:
        Path(opts.json).write_text(text)
    return result


if __name__ == "__main__":
    main()
