"""Peak memory and time of ``l2l-scale simulate`` at a small and a large size, in one run.

    python benchmarks/bench_simulate.py [--structure caveolae] [--sizes 4096,30000] [--json OUT.json]

Each size runs ``l2l-scale simulate`` as a subprocess (default LocalCluster); its resident memory is summed over the
process and all its children (scheduler, workers) every 50 ms. Invariant 3 says memory is bounded by chunk size x
workers, not by image size: the large run must stay under 2 GB and near the small one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's l2l_scale, not an installed one
from _common import emit  # noqa: E402
from _procmem import run_measured  # noqa: E402

TARGET_GB = 2.0


def measure(cmd: list[str]) -> dict:
    r = run_measured(cmd)
    return {"returncode": r["returncode"], "seconds": round(r["seconds"], 1), "peak_rss_gb": round(r["peak_rss"] / 1e9, 3),
            "stderr_tail": r["stderr"].strip().splitlines()[-1:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structure", default="caveolae")
    ap.add_argument("--sizes", default="4096,30000")
    ap.add_argument("--json")
    ap.add_argument("--keep", action="store_true", help="keep the written images")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_simulate_"))
    report = {"structure": args.structure, "target_peak_gb": TARGET_GB, "runs": {}}
    for size in [int(s) for s in args.sizes.split(",")]:
        out = work / f"{args.structure}_{size}.zarr"
        cmd = [sys.executable, "-m", "l2l_scale.cli", "simulate", "--structure", args.structure, "--size",
               str(size), str(out)]
        report["runs"][str(size)] = measure(cmd)
        report["runs"][str(size)]["megapixels"] = size * size / 1e6
        print(json.dumps({size: report["runs"][str(size)]}), file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    peaks = [r["peak_rss_gb"] for r in report["runs"].values()]
    report["largest_peak_gb"] = peaks[-1]
    report["peak_growth_largest_over_smallest"] = round(peaks[-1] / peaks[0], 3)
    report["meets_target"] = all(r["returncode"] == 0 for r in report["runs"].values()) and peaks[-1] < TARGET_GB
    emit(report, args.json)


if __name__ == "__main__":
    main()
