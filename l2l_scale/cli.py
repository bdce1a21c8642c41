"""The ``l2l-scale`` command: a thin layer that parses options and calls the pipeline modules.

Each subcommand maps to one module. User errors (:class:`l2l_scale.errors.L2LError`) are printed on one line and
exit with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from l2l_scale import __version__
from l2l_scale.errors import ConfigError, L2LError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the default prints the whole usage block first)."""

    def error(self, message: str) -> None:  # noqa: D102
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _floats(text: str, n: int | None = None, what: str = "values") -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise ConfigError(f"{what} {text!r} must be comma-separated numbers") from None
    if n is not None and len(vals) != n:
        raise ConfigError(f"{what} {text!r} needs exactly {n} comma-separated numbers")
    return vals


def _names(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (default: a LocalCluster on this machine, dashboard on 127.0.0.1)")
    g.add_argument("--workers", type=int, help="LocalCluster worker processes (default: one per core)")
    g.add_argument("--threads-per-worker", type=int, help="threads per worker (default 1)")
    g.add_argument("--memory-limit", help="memory limit per worker, e.g. 4GB (default auto)")
    g.add_argument("--scheduler", help="address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786, "
                                       "or 'threads' for the in-process threaded scheduler")


def _cluster(args: argparse.Namespace, *, model_step: bool = False):
    from l2l_scale.cluster import config_from_options, dask_client

    return dask_client(config_from_options(args.workers, args.threads_per_worker, args.memory_limit, args.scheduler,
                                           model_step=model_step))


# ------------------------------------------------------------------------------------------- subcommands


def _cmd_simulate(args: argparse.Namespace) -> int:
    from l2l_scale.synthetic import write_simulation

    drift = _floats(args.drift, 2, "--drift") if args.drift else (0.0, 0.0)
    with _cluster(args):
        out = write_simulation(args.output, structure=args.structure, size=args.size, fields=args.fields,
                               seed=args.seed, n2n=args.n2n, drift=drift, chunks=args.chunks,
                               overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from l2l_scale.io.ome_zarr import read_info
    from l2l_scale.io.info import format_info

    info = read_info(args.path)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from l2l_scale.io.convert import convert

    pixel = _floats(args.pixel_size, None, "--pixel-size") if args.pixel_size else None
    if pixel is not None and len(pixel) == 1:
        pixel = pixel[0]
    with _cluster(args):
        outs = convert(args.inputs, args.output, plate=args.plate, axes=args.axes, pixel_size=pixel,
                       channel_names=_names(args.channel_names), chunks=args.chunks, overwrite=args.overwrite)
    for o in outs:
        print(f"wrote {o}")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from l2l_scale.preprocess.normalize import dataset_stats, parse_percentiles, write_stats

    q = parse_percentiles(args.percentiles)
    with _cluster(args):
        stats = dataset_stats(args.input, q=q, scope=args.scope, channels=_names(args.channels))
    text = json.dumps(stats, indent=2)
    if args.json:
        write_stats(stats, args.json, overwrite=args.overwrite)
        print(f"wrote {args.json}")
    else:
        print(text)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from l2l_scale.predict import predict

    with _cluster(args, model_step=True):
        out = predict(args.model, args.input, args.output, channels=_names(args.channel), tile=args.tile,
                      batch=args.batch, dtype=args.dtype, percentiles=args.percentiles, norm_stats=args.norm_stats,
                      norm_scope=args.norm_scope, weights=args.weights, resume=args.resume,
                      overwrite=args.overwrite, chunks=args.chunks)
    print(f"wrote {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from l2l_scale.demo import run_demo

    run_demo(out=args.out, size=args.size, epochs=args.epochs, overwrite=args.overwrite,
             cluster_args=dict(workers=args.workers, threads_per_worker=args.threads_per_worker,
                               memory_limit=args.memory_limit, scheduler=args.scheduler))
    return 0


# --------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The ``l2l-scale`` argument parser (one subcommand per pipeline module)."""
    parser = _Parser(prog="l2l-scale", description="Label2label restoration of immunofluorescence images at "
                                                   "facility scale (OME-Zarr + Dask + CARE).")
    parser.add_argument("--version", action="version", version=f"l2l-scale {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, func: Callable, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
        p.set_defaults(func=func)
        return p

    p = add("demo", _cmd_demo, "run the whole pipeline on simulated actin data and write an HTML report")
    p.add_argument("--out", default="l2l-demo", help="output folder (default ./l2l-demo)")
    p.add_argument("--size", type=int, default=None, help="mosaic size in pixels (default 2048)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: a few minutes on a CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")
    _cluster_args(p)

    p = add("simulate", _cmd_simulate, "write simulated dual-label images with ground truth as OME-Zarr")
    p.add_argument("output", help="output .zarr (an image, or an HCS plate with --fields > 1)")
    p.add_argument("--structure", default="actin",
                   help="actin, tubulin, adhesions, caveolae or nuclei-membrane (default actin)")
    p.add_argument("--size", type=int, default=2048, help="image side in pixels (default 2048)")
    p.add_argument("--fields", type=int, default=1, help="number of fields; > 1 writes an HCS plate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n2n", action="store_true", help="add a second noise realisation of the input label")
    p.add_argument("--drift", help="stage drift DY,DX in pixels of the --n2n repeat acquisition")
    p.add_argument("--chunks", type=int, default=1024, help="chunk side in pixels (default 1024)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _cluster_args(p)

    p = add("info", _cmd_info, "describe an OME-Zarr image, plate or folder")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = add("convert", _cmd_convert, "convert TIFF / OME-TIFF files to OME-Zarr (an image, a folder or a plate)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="TIFF files, folders or globs")
    p.add_argument("output", help="output .zarr (one input) or folder / plate (several inputs)")
    p.add_argument("--plate", metavar="PATTERN",
                   help=r"regex with groups row, col and field matched on file names, e.g. "
                        r"'(?P<row>[A-H])(?P<col>\d+)_f(?P<field>\d+)'; writes one HCS plate")
    p.add_argument("--pixel-size", help="pixel size in micrometres: one value, or Y,X")
    p.add_argument("--channel-names", help="comma-separated channel names")
    p.add_argument("--axes", help="TIFF axes when ambiguous, e.g. CYX or ZYX")
    p.add_argument("--chunks", type=int, default=None, help="chunk side in pixels (default 1024)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _cluster_args(p)

    p = add("stats", _cmd_stats, "exact per-channel normalisation percentiles of an image, plate or folder")
    p.add_argument("input")
    p.add_argument("--percentiles", default="1,99.9", help="low,high (default 1,99.9)")
    p.add_argument("--scope", choices=("image", "dataset"), default="image",
                   help="one set of percentiles per image, or pooled over the dataset")
    p.add_argument("--channels", help="comma-separated channel names (default: all)")
    p.add_argument("--json", metavar="OUT.json", help="write the statistics here (else print them)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing JSON")
    _cluster_args(p)

    p = add("predict", _cmd_predict, "restore an image, plate or folder with a CARE/L2L model (tiled, distributed)")
    p.add_argument("model", help="CSBDeep/l2l-scale model folder (config.json + weights_*.h5)")
    p.add_argument("input", help="OME-Zarr image, plate or folder")
    p.add_argument("output", help="output .zarr")
    p.add_argument("--channel", help="input channel name(s), one per model input channel, comma-separated "
                                     "(default: the model's l2l_scale.json)")
    p.add_argument("--tile", type=int, default=None, help="tile side in pixels without halo (default 1024)")
    p.add_argument("--batch", type=int, default=None, help="tiles per model call (default 4)")
    p.add_argument("--dtype", choices=("float32", "uint16"), default="float32",
                   help="output dtype; uint16 stores a scale and offset in the attributes")
    p.add_argument("--percentiles", help="normalisation percentiles low,high (default: the model's, else 2,99.8)")
    p.add_argument("--norm-stats", help="JSON from 'l2l-scale stats' to take the percentile values from")
    p.add_argument("--norm-scope", choices=("image", "dataset"), default="image",
                   help="normalise each image, or the whole plate/folder with one set of values")
    p.add_argument("--weights", help="weights file name in the model folder (default weights_best.h5)")
    p.add_argument("--chunks", type=int, default=None, help="output chunk side (default: the tile size)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run, computing only missing blocks")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _cluster_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``l2l-scale`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return int(args.func(args) or 0)
    except L2LError as exc:
        if args.debug:
            raise
        print(f"l2l-scale {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"l2l-scale {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
