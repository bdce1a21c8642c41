"""The ``l2l-scale`` argument parser: one subcommand per pipeline module, grouped by pipeline stage, with the
cluster, U-Net and output options shared through argparse parent parsers."""

from __future__ import annotations

import argparse
import functools
from typing import Callable

from l2l_scale import __version__
from l2l_scale.cli.commands import (_cmd_baseline, _cmd_contrast, _cmd_convert, _cmd_crossval, _cmd_demo,
                                    _cmd_evaluate, _cmd_export_bioimageio, _cmd_info, _cmd_patches, _cmd_predict,
                                    _cmd_register, _cmd_report, _cmd_simulate, _cmd_stats, _cmd_train)


EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the default prints the whole usage block first)."""

    def error(self, message: str) -> None:  # noqa: D102
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _SharedLast(argparse.HelpFormatter):
    """Usage lines name a command's own arguments first and the options from the parent parsers last."""

    def add_usage(self, usage, actions, groups, prefix=None):  # noqa: D102
        shared = _shared_dests()
        super().add_usage(usage, sorted(actions, key=lambda a: a.dest in shared), groups, prefix)


@functools.lru_cache(maxsize=None)
def _shared_dests() -> frozenset[str]:
    return frozenset(a.dest for parent in (_cluster_parent(), _unet_parent(), _output_parent("", "-"))
                     for a in parent._actions)


_REPLACE = "replace an existing output"
_RESUME_BLOCKS = "finish an interrupted run, computing only missing blocks"


def _cluster_parent() -> argparse.ArgumentParser:
    """The cluster options every distributed command shares (an argparse parent parser)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("cluster (default: a LocalCluster on this machine, dashboard on 127.0.0.1)")
    g.add_argument("--workers", type=int, help="LocalCluster worker processes (default: one per core)")
    g.add_argument("--threads-per-worker", type=int, help="threads per worker (default 1)")
    g.add_argument("--memory-limit", help="memory limit per worker, e.g. 4GB (default auto)")
    g.add_argument("--scheduler", help="address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786, a "
                                       "scheduler file (dask scheduler --scheduler-file), or 'threads' for the "
                                       "in-process threaded scheduler")
    g.add_argument("--cluster", metavar="FILE.yaml",
                   help="cluster config: kind local, address (TLS), cuda, slurm/pbs/lsf or kubernetes; examples in "
                        "deploy/ (default: $L2L_SCALE_CLUSTER if set)")
    return p


def _output_parent(overwrite: str, resume: str | None = None) -> argparse.ArgumentParser:
    """``--overwrite`` (and ``--resume``) of a command that writes an output; the help says what is replaced."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument("--overwrite", action="store_true", help=overwrite)
    if resume:
        g.add_argument("--resume", action="store_true", help=resume)
    return p


def _default(config: type, field: str) -> object:
    """A pydantic config field's default, so that help texts cannot drift from the configs."""
    return config.model_fields[field].default


def _unet_parent() -> argparse.ArgumentParser:
    """The CARE U-Net architecture options of the commands that train (defaults: :class:`TrainConfig`)."""
    from l2l_scale.config import TrainConfig

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("U-Net architecture (CSBDeep CARE)")
    g.add_argument("--unet-depth", type=int, default=None,
                   help=f"U-Net depth (default {_default(TrainConfig, 'unet_n_depth')})")
    g.add_argument("--unet-kern-size", type=int, default=None,
                   help=f"convolution kernel size (default {_default(TrainConfig, 'unet_kern_size')})")
    g.add_argument("--unet-n-first", type=int, default=None,
                   help=f"filters of the first level (default {_default(TrainConfig, 'unet_n_first')})")
    return p


# --------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The ``l2l-scale`` argument parser (one subcommand per pipeline module)."""
    parser = _Parser(prog="l2l-scale", description="Label2label restoration of immunofluorescence images at "
                                                   "facility scale (OME-Zarr + Dask + CARE).")
    parser.add_argument("--version", action="version", version=f"l2l-scale {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, func: Callable, help_: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, parents=list(parents), formatter_class=_SharedLast)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
        p.set_defaults(func=func)
        return p

    cluster, unet = _cluster_parent(), _unet_parent()
    for add_commands in (_add_data_commands, _add_preprocess_commands, _add_model_commands, _add_judge_commands):
        add_commands(add, cluster, unet)
    return parser


def _add_data_commands(add: Callable, cluster: argparse.ArgumentParser,
                       unet: argparse.ArgumentParser) -> None:
    """demo, simulate, info and convert: data in and out."""
    p = add("demo", _cmd_demo, "run the whole pipeline on simulated actin data and write an HTML report",
            _output_parent("replace an existing demo folder"), cluster)
    p.add_argument("--out", default="l2l-demo", help="output folder (default ./l2l-demo)")
    p.add_argument("--size", type=int, default=None, help="mosaic size in pixels (default 2048)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: a few minutes on a CPU)")

    p = add("simulate", _cmd_simulate, "write simulated dual-label images with ground truth as OME-Zarr",
            _output_parent(_REPLACE), cluster)
    p.add_argument("output", help="output .zarr (an image, or an HCS plate with --fields > 1)")
    p.add_argument("--structure", default="actin",
                   help="actin, tubulin, adhesions, caveolae or nuclei-membrane (default actin)")
    p.add_argument("--size", type=int, default=2048, help="image side in pixels (default 2048)")
    p.add_argument("--fields", type=int, default=1, help="number of fields; > 1 writes an HCS plate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n2n", action="store_true", help="add a second noise realisation of the input label")
    p.add_argument("--drift", help="stage drift DY,DX in pixels of the --n2n repeat acquisition")
    p.add_argument("--chunks", type=int, default=1024, help="chunk side in pixels (default 1024)")

    p = add("info", _cmd_info, "describe an OME-Zarr image, plate or folder")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = add("convert", _cmd_convert, "convert TIFF / OME-TIFF files to OME-Zarr (an image, a folder or a plate)",
            _output_parent(_REPLACE), cluster)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="TIFF files, folders or globs")
    p.add_argument("output", help="output .zarr (one input) or folder / plate (several inputs)")
    p.add_argument("--plate", metavar="PATTERN",
                   help=r"regex with groups row, col and field matched on file names, e.g. "
                        r"'(?P<row>[A-H])(?P<col>\d+)_f(?P<field>\d+)'; writes one HCS plate")
    p.add_argument("--pixel-size", help="pixel size in micrometres: one value, or Y,X")
    p.add_argument("--channel-names", help="comma-separated channel names")
    p.add_argument("--axes", help="TIFF axes when ambiguous, e.g. CYX or ZYX")
    p.add_argument("--chunks", type=int, default=None, help="chunk side in pixels (default 1024)")


def _add_preprocess_commands(add: Callable, cluster: argparse.ArgumentParser,
                             unet: argparse.ArgumentParser) -> None:
    """stats, register, contrast and baseline."""
    p = add("stats", _cmd_stats, "exact per-channel normalisation percentiles of an image, plate or folder",
            _output_parent("replace an existing JSON"), cluster)
    p.add_argument("input")
    p.add_argument("--percentiles", default="1,99.9", help="low,high (default 1,99.9)")
    p.add_argument("--scope", choices=("image", "dataset"), default="image",
                   help="one set of percentiles per image, or pooled over the dataset")
    p.add_argument("--channels", help="comma-separated channel names (default: all)")
    p.add_argument("--json", metavar="OUT.json", help="write the statistics here (else print them)")

    p = add("register", _cmd_register, "correct stage drift: register channels onto a reference channel and crop "
                                       "to the common region",
            _output_parent(_REPLACE, resume=_RESUME_BLOCKS), cluster)
    p.add_argument("input", help="OME-Zarr image, plate or folder")
    p.add_argument("output", help="output .zarr (same layout; shifts stored in the attributes)")
    p.add_argument("--reference", required=True, help="reference channel name (not moved)")
    p.add_argument("--moving", required=True, help="channel(s) to register, comma-separated")
    p.add_argument("--method", choices=("phase", "ssim"), default="phase",
                   help="phase: sub-pixel cross-correlation (default); ssim: the paper's +-5 px SSIM search")
    p.add_argument("--moving-image", metavar="OTHER.zarr",
                   help="take the --moving channels from this second acquisition (same fields, shape, pixel size)")
    p.add_argument("--max-shift", type=float, default=None,
                   help="largest plausible shift in px (default: a quarter of the smaller image side)")
    p.add_argument("--patches", type=int, default=100, help="foreground patch pairs per estimate (default 100)")
    p.add_argument("--order", type=int, default=1, help="interpolation order of the shift, 0-5 (default 1)")
    p.add_argument("--seed", type=int, default=0, help="patch sampling seed (default 0)")
    p.add_argument("--chunks", type=int, default=None, help="output chunk side (default: the input's)")

    p = add("contrast", _cmd_contrast, "Michelson/RMS label contrast per channel and which label should be the "
                                       "input and which the target",
            _output_parent("replace an existing JSON"), cluster)
    p.add_argument("input", help="OME-Zarr image, plate or folder (averaged over images)")
    p.add_argument("--channels", required=True, help="the labels to compare, comma-separated, e.g. AC-15,phalloidin")
    p.add_argument("--top-fraction", type=float, default=0.1,
                   help="brightest fraction taken as the sample (default 0.1; paper: 0.01 for STED caveolae)")
    p.add_argument("--sigma", type=float, default=2.0, help="Gaussian sigma before normalising (default 2)")
    p.add_argument("--percentiles", default="1,99", help="normalisation percentiles low,high (default 1,99)")
    p.add_argument("--no-clip", action="store_true", help="do not clip the normalised image to [0, 1]")
    p.add_argument("--json", metavar="OUT.json", help="also write the result as JSON")

    p = add("baseline", _cmd_baseline, "classical restoration baselines of the paper (Table S1): gaussian, "
                                       "rolling-ball, tophat, clahe",
            _output_parent(_REPLACE, resume=_RESUME_BLOCKS), cluster)
    p.add_argument("method", choices=("gaussian", "rolling-ball", "tophat", "clahe"))
    p.add_argument("input", help="OME-Zarr image, plate or folder")
    p.add_argument("output", help="output .zarr (float32, same layout)")
    p.add_argument("--channel", required=True, help="channel(s) to filter, comma-separated")
    p.add_argument("--preset", choices=("actin", "tubulin", "caveolae", "pxn"),
                   help="the paper's parameters for this dataset (explicit flags override them)")
    p.add_argument("--sigma", type=float, help="gaussian: sigma in px (paper 2/2/3/2)")
    p.add_argument("--radius", type=float, help="rolling-ball: ball radius in px (paper 20/10/5/5)")
    p.add_argument("--size", type=int, help="tophat: square footprint side in px (paper 11/25/13/17)")
    p.add_argument("--grid", type=int,
                   help="clahe: contextual regions per side, OpenCV's tileGridSize (paper 11/7/7/7)")
    p.add_argument("--kernel-size", help="clahe: region size in px instead of --grid (one value, or Y,X)")
    p.add_argument("--clip-limit", type=float, help="clahe: skimage clip limit (default 0.01)")
    p.add_argument("--chunks", type=int, default=None, help="output chunk side (default: the input's)")


def _add_model_commands(add: Callable, cluster: argparse.ArgumentParser,
                        unet: argparse.ArgumentParser) -> None:
    """export-bioimageio, predict, patches and train."""
    from l2l_scale.config import PatchConfig, TrainConfig

    pd, td = functools.partial(_default, PatchConfig), functools.partial(_default, TrainConfig)
    p = add("export-bioimageio", _cmd_export_bioimageio,
            "write a bioimage.io model package (format 0.5 zip: keras_hdf5, onnx and TF SavedModel weights)",
            _output_parent("replace an existing zip"))
    p.add_argument("model", help="model folder from 'l2l-scale train' (or a CSBDeep CARE folder)")
    p.add_argument("output", help="output .zip")
    p.add_argument("--author", action="append", help="author name (repeat for several; at least one)")
    p.add_argument("--license", default="CC-BY-4.0", help="SPDX license of the weights (default CC-BY-4.0)")
    p.add_argument("--name", help="package name (default from the channels)")
    p.add_argument("--description", help="one-paragraph description (default from the training)")
    p.add_argument("--test-image", help="OME-Zarr image with the model's input channels for the test tensors "
                                        "(default: a simulated field)")
    p.add_argument("--weights", help="weights file name in the model folder (default weights_best.h5)")
    p.add_argument("--weight-formats", default="keras_hdf5,onnx,tensorflow_saved_model_bundle",
                   help="comma-separated weight formats (default all three; keras_hdf5 is always written)")

    p = add("predict", _cmd_predict, "restore an image, plate or folder with a CARE/L2L model (tiled, distributed)",
            _output_parent(_REPLACE, resume=_RESUME_BLOCKS), cluster)
    p.add_argument("model", help="CSBDeep/l2l-scale model folder (config.json + weights_*.h5), bioimage.io "
                                 "package (zip or folder) or CSBDeep export_TF SavedModel zip")
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
    p.add_argument("--halo", type=int, default=None,
                   help="halo in pixels (default and minimum: the model's receptive field)")
    p.add_argument("--weights", help="weights file name in the model folder (default weights_best.h5)")
    p.add_argument("--chunks", type=int, default=None, help="output chunk side (default: the tile size)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="compute precision (default fp32, exact); bf16/fp16 need a GPU or a CPU with bf16/fp16")

    p = add("patches", _cmd_patches, "sample normalised (augmented) training patches from image pairs into a patch "
                                     "store",
            _output_parent(_REPLACE, resume="finish an interrupted run, computing only missing tasks"), cluster)
    p.add_argument("dataset", help="OME-Zarr image, plate or folder; each image is one input/target pair")
    p.add_argument("output", help="output patch store (.zarr)")
    p.add_argument("--preset", help="paper preset: actin, tubulin, caveolae, pxn or separation (channels, "
                                    "percentiles, zooms, Poisson noise)")
    p.add_argument("--mode", choices=("l2l", "n2n", "separate"), default=None,
                   help="l2l: input label -> target label; n2n: first -> second noise realisation; separate: "
                        "superposed channel -> several targets (default l2l)")
    p.add_argument("--input-channel", help="input channel name(s) or index(es), comma-separated")
    p.add_argument("--target-channel", help="target channel name(s), comma-separated (n2n default: INPUT-repeat)")
    p.add_argument("--patch-size", type=int, default=None, help=f"patch side in pixels (default {pd('patch_size')})")
    p.add_argument("--patches-per-image", type=int, default=None,
                   help=f"patches per image (default {pd('patches_per_image')})")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="half of the patches from zoomed and rotated images (on with a preset)")
    p.add_argument("--zooms", help="zoom factors, comma-separated (default 0.5,0.75,1.25,1.5)")
    p.add_argument("--poisson-noise", action=argparse.BooleanOptionalAction, default=None,
                   help="add Poisson noise to the raw intensities (near-binary STED data; on for caveolae)")
    p.add_argument("--percentiles", help="normalisation percentiles low,high (default 2,99.8 or the preset's)")
    p.add_argument("--sample-percentiles", action="store_true", default=None,
                   help="draw each patch's percentiles from 1-3 / 99.5-99.9 (CSBDeep's create_patches default)")
    p.add_argument("--norm-stats", help="JSON from 'l2l-scale stats' with the percentile values to use")
    p.add_argument("--split-by", choices=("pair", "patch"), default=None,
                   help="validation split by image pair (default) or by patch (CSBDeep's 90/10)")
    p.add_argument("--validation-fraction", type=float, default=None,
                   help=f"validation fraction (default {pd('validation_fraction')})")
    p.add_argument("--threshold", type=float, default=None,
                   help="foreground threshold x the target's 99.9th percentile (default 0.4, CSBDeep)")
    p.add_argument("--foreground", choices=("csbdeep", "any"), default=None,
                   help="several targets: csbdeep = the middle target decides, against the percentile of all "
                        "targets (CSBDeep's create_patches, default); any = every target, each its own percentile")
    p.add_argument("--seed", type=int, default=None, help=f"sampling seed (default {pd('seed')})")
    p.add_argument("--chunk-patches", type=int, default=None, help="patches per zarr chunk (default ~16 MB)")

    p = add("train", _cmd_train, "train a CARE U-Net on a patch store (tf.distribute) and export a CSBDeep model",
            unet, _output_parent("replace a model or an interrupted run in MODEL_DIR",
                                 resume="continue from the last checkpoint in MODEL_DIR"))
    p.add_argument("patches", help="patch store from 'l2l-scale patches'")
    p.add_argument("model_dir", help="output model folder (CSBDeep layout + checkpoints/ and logs/)")
    p.add_argument("--config", help="YAML file with training settings (flags override it)")
    p.add_argument("--preset", help="paper preset: actin, tubulin, caveolae, pxn or separation (learning rate, "
                                    "batch size, steps per epoch, epochs)")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs (default {td('epochs')})")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help=f"training steps per epoch (default {td('steps_per_epoch')})")
    p.add_argument("--batch-size", type=int, default=None, help=f"global batch size (default {td('batch_size')})")
    p.add_argument("--learning-rate", type=float, default=None,
                   help=f"Adam learning rate (default {td('learning_rate'):g})")
    p.add_argument("--loss", choices=("l1", "l2", "ssim", "ms-ssim3", "ms-ssim5", "ms-ssim"), default=None,
                   help="training loss (default l1)")
    p.add_argument("--ssim-weights", help="MS-SSIM weights, one per scale, comma-separated")
    p.add_argument("--ssim-filter-size", type=int, default=None, help="(MS-)SSIM Gaussian filter size")
    p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=None,
                   help="residual U-Net (default: when input and output channel counts match)")
    p.add_argument("--early-stopping", type=int, default=None, metavar="PATIENCE",
                   help="stop after PATIENCE epochs without a validation-loss improvement")
    p.add_argument("--strategy", choices=("auto", "mirrored", "multiworker", "none"), default=None,
                   help="auto: all GPUs (MirroredStrategy) or none; multiworker reads TF_CONFIG")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help="mixed-precision training (default fp32; fp16 uses loss scaling)")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed of initialisation and shuffling (default {td('seed')})")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="TensorBoard logs when tensorboard is installed (default on)")


def _add_judge_commands(add: Callable, cluster: argparse.ArgumentParser,
                        unet: argparse.ArgumentParser) -> None:
    """evaluate, report and crossval."""
    p = add("evaluate", _cmd_evaluate, "compare restorations with the target label (and a ground truth): Table 1 "
                                       "metrics, contrast and difference maps",
            _output_parent("replace an existing results folder"), cluster)
    p.add_argument("output", metavar="OUT_DIR", help="results folder: evaluation.json, metrics.csv, maps/")
    p.add_argument("--target", required=True, metavar="PATH[:CHANNEL]",
                   help="target label, e.g. sim.zarr:phalloidin (plate fields as PLATE.zarr/A/1/0:CHANNEL)")
    p.add_argument("--input", metavar="PATH[:CHANNEL]", help="raw input label (an 'input' row; maps reference)")
    p.add_argument("--truth", metavar="PATH[:CHANNEL]", help="ground truth: also compare everything against it")
    p.add_argument("--method", action="append", default=[], metavar="NAME=PATH[:CHANNEL]",
                   help="a restoration to compare (repeat: l2l, n2n, baselines...); the default channel is the "
                        "only channel")
    p.add_argument("--model", action="append", default=[], metavar="[NAME=]DIR",
                   help="model folder whose training curves the report shows (prediction models are found "
                        "automatically)")
    p.add_argument("--crossval", metavar="crossval.json", help="cross-validation summary to show in the report")
    p.add_argument("--normalize", choices=("percentile", "none"), default="percentile",
                   help="percentile: map every image's own whole-image percentiles to 0/1 (default); none: raw "
                        "values (types must match)")
    p.add_argument("--percentiles", default="1,99.9", help="normalisation percentiles low,high (default 1,99.9)")
    p.add_argument("--patches", type=int, default=64, help="foreground validation patches (default 64; 0 = none)")
    p.add_argument("--patch-size", type=int, default=128, help="patch side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="patch sampling seed (default 0)")
    p.add_argument("--threshold", type=float, default=0.4,
                   help="foreground threshold x the target's 99.9th percentile (default 0.4, CSBDeep)")
    p.add_argument("--data-range", type=float, default=None,
                   help="metrics data range (default 1 when normalised, else the target dtype's)")
    p.add_argument("--smooth", type=float, default=0.0,
                   help="Gaussian sigma applied before comparing (paper: 1.5 for STED caveolae; default 0)")
    p.add_argument("--rms-sigma", type=float, default=2.0, help="Gaussian sigma of the local RMS map (default 2)")
    p.add_argument("--contrast-top-fraction", type=float, default=0.1,
                   help="contrast sample: brightest fraction (default 0.1; paper 0.01 for caveolae)")
    p.add_argument("--contrast-percentiles", default="1,99", help="contrast normalisation low,high (default 1,99)")
    p.add_argument("--chunks", type=int, default=None, help="chunk side of the difference maps (default 1024)")

    p = add("report", _cmd_report, "write a self-contained HTML report of an evaluation folder",
            _output_parent("replace an existing report"))
    p.add_argument("results", metavar="RESULTS_DIR", help="folder written by 'l2l-scale evaluate'")
    p.add_argument("--out", metavar="report.html", help="HTML file (default RESULTS_DIR/report.html)")
    p.add_argument("--crop-size", type=int, default=256, help="side of the image crops in pixels (default 256)")
    p.add_argument("--crop", metavar="Y,X", help="top-left corner of the crops (default: on a foreground patch)")

    p = add("crossval", _cmd_crossval, "repeated k-fold cross-validation split by image pair (paper Fig. 5, "
                                       "Table 3): relative change of NRMSE and 5-scale MS-SSIM per N",
            unet, _output_parent("delete an existing OUT_DIR first",
                                 resume="finish an interrupted run; finished folds are skipped"), cluster)
    p.add_argument("dataset", help="OME-Zarr plate or folder; each image (field) is one input/target pair")
    p.add_argument("out_dir", metavar="OUT_DIR", help="results: crossval.json, crossval.csv, folds/, run.json")
    p.add_argument("--input-channel", help="input label (one channel; default: the preset's)")
    p.add_argument("--target-channel", help="training target label (n2n default: INPUT-repeat)")
    p.add_argument("--reference-channel", help="label the metrics compare with (default: the target channel)")
    p.add_argument("--mode", choices=("l2l", "n2n"), default="l2l", help="l2l (default) or n2n")
    p.add_argument("--preset", choices=("actin", "tubulin", "caveolae", "pxn"),
                   help="the paper's channels, normalisation and Table 3 settings (folds, N, repeats, epochs, "
                        "loss, learning rate); explicit options override them")
    p.add_argument("--folds", type=int, default=None, help="k of the k-fold split (default 8, or the preset's)")
    p.add_argument("--pairs", help="numbers of pairs N, comma-separated (default 8,16,32,64, or the preset's)")
    p.add_argument("--repeats", help="repeats per N, comma-separated (default 10,5,3,2, or the preset's)")
    p.add_argument("--epochs-per-pair", type=float, default=None,
                   help="epochs = round(E x N) (preset: the paper's epochs at its largest N / N)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="training steps per epoch (preset: 150)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (preset: 32)")
    p.add_argument("--learning-rate", type=float, default=None, help="Adam learning rate (preset: Table 3)")
    p.add_argument("--loss", choices=("l1", "l2", "ssim", "ms-ssim3", "ms-ssim5"), default=None,
                   help="training loss (preset: Table 3, ms-ssim3 or l1 for pxn)")
    p.add_argument("--patch-size", type=int, default=None, help="patch side in pixels (default 128)")
    p.add_argument("--patches-per-image", type=int, default=None, help="patches per training pair (default 512)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="zoom and rotation augmentation (on with a preset)")
    p.add_argument("--percentiles", help="normalisation percentiles low,high for training and metrics")
    p.add_argument("--smooth", type=float, default=None,
                   help="Gaussian sigma before the metrics (caveolae preset: 1.5; default 0)")
    p.add_argument("--tile", type=int, default=None, help="prediction tile side (default 1024)")
    p.add_argument("--strategy", choices=("auto", "mirrored", "none"), default=None,
                   help="tf.distribute strategy of each fold's training (default auto)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help="compute precision of each fold's training and prediction (default fp32)")
    p.add_argument("--seed", type=int, default=0, help="seed of pair draws, patches and training (default 0)")
    p.add_argument("--keep-work", action="store_true", help="keep each fold's patches, model and restorations")
