"""``l2l-scale demo``: the whole pipeline on simulated actin, ending in an HTML report.

The demo runs the same public functions as the subcommands, in order, on one LocalCluster:

1. simulate an 8-field actin plate (training pairs, with a Noise2Noise repeat) and a larger actin mosaic;
2. measure label contrast and pick the input and target labels (the paper's rule: higher contrast = target);
3. extract L2L patches (input -> target) and N2N patches (input -> repeat) from the plate;
4. train a small L2L model and an N2N model with the same budget;
5. restore the mosaic with both models (tiled, on the cluster);
6. compute the classical baselines with the paper's actin parameters;
7. evaluate everything against the target label and the simulator's ground truth;
8. write the report.

Defaults finish in about 15 minutes on a 2-core CPU; ``--size`` and ``--epochs`` scale it up on real hardware.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from l2l_scale.errors import OutputError

STAGES = 8
DEFAULT_SIZE = 2048
DEFAULT_EPOCHS = 12
PLATE_FIELDS = 8
PLATE_SIZE = 1024
BASELINES = ("gaussian", "rolling-ball", "tophat", "clahe")
# A small network that trains in minutes on a CPU (the paper used depth 2, 32 filters, kernel 5 on GPUs).
DEMO_NET = dict(unet_n_depth=2, unet_n_first=16, unet_kern_size=3)
DEMO_PATCHES = dict(patch_size=64, patches_per_image=256)
DEMO_STEPS = 40
DEMO_BATCH = 16


def _stage(i: int, text: str) -> float:
    print(f"\n[{i}/{STAGES}] {text}", file=sys.stderr, flush=True)
    return time.perf_counter()


def run_demo(out: str | Path = "l2l-demo", *, size: int | None = None, epochs: int | None = None,
             overwrite: bool = False, cluster_args: Mapping[str, Any] | None = None,
             command: str | None = None) -> Path:
    """Run the end-to-end demo and return the path of the HTML report.

    Parameters
    ----------
    out : path
        Folder for everything the demo writes (simulated data, patches, models, restorations, results).
    size : int, optional
        Side of the simulated mosaic that is restored and evaluated (default 2048).
    epochs : int, optional
        Training epochs for each model (default 12, about 2-3 minutes per model on a 2-core CPU).
    overwrite : bool
        Replace an existing demo folder.
    cluster_args : mapping, optional
        ``workers``, ``threads_per_worker``, ``memory_limit``, ``scheduler`` as for every command.
    command : str, optional
        The command line recorded in the provenance of every output (the CLI passes its own; default: this
        process's command line).
    """
    from l2l_scale.cluster import config_from_options, dask_client
    from l2l_scale.evaluate.evaluate import evaluate, format_table
    from l2l_scale.evaluate.report import report
    from l2l_scale.patches import create_patches
    from l2l_scale.predict import predict
    from l2l_scale.preprocess.baselines import run_baseline
    from l2l_scale.preprocess.contrast import dataset_contrast
    from l2l_scale.synthetic import write_simulation
    from l2l_scale.train import train

    out = Path(out)
    size = int(size or DEFAULT_SIZE)
    epochs = int(epochs or DEFAULT_EPOCHS)
    if out.exists():
        if not overwrite:
            raise OutputError(f"{out}: demo folder exists; pass --overwrite to replace it or --out another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t_start = time.perf_counter()
    with dask_client(config_from_options(**(cluster_args or {}))):
        _stage(1, f"simulating an {PLATE_FIELDS}-field actin plate and a {size}x{size} actin mosaic")
        plate = write_simulation(out / "plate.zarr", structure="actin", size=PLATE_SIZE, fields=PLATE_FIELDS,
                                 seed=1, n2n=True, command=command)
        mosaic = write_simulation(out / "mosaic.zarr", structure="actin", size=size, fields=1, seed=1000, n2n=True,
                                  command=command)

        _stage(2, "measuring label contrast to choose input and target")
        contrast = dataset_contrast(plate, ["AC-15", "phalloidin"])
        rec = contrast["recommendation"]
        inp, tgt = rec["input"], rec["target"]
        print(f"input {inp} -> target {tgt}: {rec['reason']}", file=sys.stderr)

        _stage(3, "extracting L2L and N2N training patches")
        common = dict(preset="actin", augment=True, seed=0, command=command, **DEMO_PATCHES)
        p_l2l = create_patches(plate, out / "patches-l2l.zarr", mode="l2l", input_channels=[inp],
                               target_channels=[tgt], **common)
        p_n2n = create_patches(plate, out / "patches-n2n.zarr", mode="n2n", input_channels=[inp],
                               target_channels=[f"{inp}-repeat"], **common)

        _stage(4, f"training an L2L and an N2N model ({epochs} epochs x {DEMO_STEPS} steps each)")
        budget = dict(preset="actin", epochs=epochs, steps_per_epoch=DEMO_STEPS, batch_size=DEMO_BATCH, loss="l1",
                      strategy="none", command=command, **DEMO_NET)
        models = out / "models"
        models.mkdir()
        m_l2l = train(p_l2l, models / "l2l", **budget)
        m_n2n = train(p_n2n, models / "n2n", **budget)

        _stage(5, "restoring the mosaic with both models")
        r_l2l = predict(m_l2l, mosaic, out / "restored-l2l.zarr", channels=[inp], command=command)
        r_n2n = predict(m_n2n, mosaic, out / "restored-n2n.zarr", channels=[inp], command=command)

        _stage(6, "computing the classical baselines (paper Table S1, actin)")
        baselines = {m: run_baseline(m, mosaic, out / f"baseline-{m}.zarr", channels=[inp], preset="actin",
                                  command=command)
                     for m in BASELINES}

        _stage(7, "evaluating against the target label and the ground truth")
        results = evaluate(f"{mosaic}:{tgt}", {"L2L": f"{r_l2l}", "N2N": f"{r_n2n}",
                                               **{m: str(p) for m, p in baselines.items()}},
                           out / "results", input=f"{mosaic}:{inp}", truth=f"{mosaic}:truth",
                           models={"L2L": str(m_l2l), "N2N": str(m_n2n)}, command=command)

        _stage(8, "writing the report")
        html = report(results, out / "report.html")
    rows = json.loads((Path(results) / "evaluation.json").read_text())["metrics"]
    print("\n" + format_table(rows, reference="truth", region="image"), file=sys.stderr)
    minutes = (time.perf_counter() - t_start) / 60
    print(f"\ndemo finished in {minutes:.1f} min; report: {html.resolve()}", file=sys.stderr)
    print(html.resolve())
    return html
