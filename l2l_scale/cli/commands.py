"""The subcommands: each turns its parsed options into one call of its pipeline module."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from l2l_scale.errors import ConfigError


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


def _cluster(args: argparse.Namespace, *, model_step: bool = False, inputs: Sequence[str] = (),
             output: str | None = None):
    """Check the paths first (so a typo fails in a second, not after a cluster start), then open the client."""
    from l2l_scale.cluster import config_from_options, dask_client
    from l2l_scale.io.output import check_output
    from l2l_scale.io.read import require_exists

    for path in inputs:
        require_exists(path)
    if model_step:  # a missing Keras backend fails here, not in every worker after the cluster started
        from l2l_scale.model.backend import check_backend

        check_backend()
    if output is not None:
        check_output(output, overwrite=getattr(args, "overwrite", False), inputs=inputs)

    return dask_client(config_from_options(args.workers, args.threads_per_worker, args.memory_limit, args.scheduler,
                                           model_step=model_step, cluster_file=getattr(args, "cluster", None)))


# ------------------------------------------------------------------------------------------- subcommands


def _cmd_simulate(args: argparse.Namespace) -> int:
    from l2l_scale.synthetic import write_simulation

    drift = _floats(args.drift, 2, "--drift") if args.drift else (0.0, 0.0)
    with _cluster(args, output=args.output):
        out = write_simulation(args.output, structure=args.structure, size=args.size, fields=args.fields,
                               seed=args.seed, n2n=args.n2n, drift=drift, chunks=args.chunks,
                               overwrite=args.overwrite, command=args.command_line)
    print(f"wrote {out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from l2l_scale.io.read import read_info
    from l2l_scale.io.info import format_info

    info = read_info(args.path)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from l2l_scale.io.convert import convert, expand_inputs

    pixel = _floats(args.pixel_size, None, "--pixel-size") if args.pixel_size else None
    if pixel is not None and len(pixel) == 1:
        pixel = pixel[0]
    with _cluster(args, inputs=[str(p) for p in expand_inputs(args.inputs)], output=args.output):
        outs = convert(args.inputs, args.output, plate=args.plate, axes=args.axes, pixel_size=pixel,
                       channel_names=_names(args.channel_names), chunks=args.chunks, overwrite=args.overwrite,
                       command=args.command_line)
    for o in outs:
        print(f"wrote {o}")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from l2l_scale.preprocess.normalize import dataset_stats, parse_percentiles, write_stats

    q = parse_percentiles(args.percentiles)
    with _cluster(args, inputs=[args.input]):
        stats = dataset_stats(args.input, q=q, scope=args.scope, channels=_names(args.channels), progress=True)
    text = json.dumps(stats, indent=2)
    if args.json:
        write_stats(stats, args.json, overwrite=args.overwrite)
        print(f"wrote {args.json}")
    else:
        print(text)
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    from l2l_scale.preprocess.drift import register

    with _cluster(args, inputs=[args.input], output=args.output):
        result = register(args.input, args.output, reference=args.reference, moving=_names(args.moving) or [],
                          method=args.method, moving_image=args.moving_image, max_shift=args.max_shift,
                          n_patches=args.patches, order=args.order, seed=args.seed, overwrite=args.overwrite,
                          chunks=args.chunks, resume=args.resume, command=args.command_line)
    for key, info in result.items():
        for ch, (dy, dx) in info["shifts"].items():
            print(f"{key + ': ' if key else ''}{ch} -> {info['reference']}: shift dy={dy:+.2f} dx={dx:+.2f} px "
                  f"({info['method']})")
    print(f"wrote {args.output}")
    return 0


def _cmd_contrast(args: argparse.Namespace) -> int:
    from l2l_scale.preprocess.contrast import dataset_contrast, save_contrast

    pct = _floats(args.percentiles, 2, "--percentiles")
    if args.json:  # refuse an existing JSON before computing
        from l2l_scale.io.output import check_output

        check_output(args.json, overwrite=args.overwrite, inputs=[args.input])
    with _cluster(args, inputs=[args.input]):
        result = dataset_contrast(args.input, _names(args.channels) or [], top_fraction=args.top_fraction,
                                  sigma=args.sigma, percentiles=pct, clip=not args.no_clip)
    width = max(len(c) for c in result["channels"]) + 2
    print(f"{'channel':<{width}}{'Michelson':<18}{'RMS':<18}images")
    for ch, e in result["channels"].items():
        m, r = e["michelson"], e["rms"]
        print(f"{ch:<{width}}{m['mean']:.3f} +- {m['sd']:.3f}    {r['mean']:.3f} +- {r['sd']:.3f}    {e['n']}")
    rec = result["recommendation"]
    print(f"recommendation: input {rec['input']} -> target {rec['target']} ({rec['reason']})")
    if args.json:
        save_contrast(result, args.json, overwrite=args.overwrite, inputs=[args.input])
        print(f"wrote {args.json}")
    return 0


def _cmd_baseline(args: argparse.Namespace) -> int:
    from l2l_scale.preprocess.baselines import run_baseline

    kernel = _floats(args.kernel_size, None, "--kernel-size") if args.kernel_size else None
    if kernel is not None and len(kernel) == 1:
        kernel = kernel[0]
    with _cluster(args, inputs=[args.input], output=args.output):
        out = run_baseline(args.method, args.input, args.output, channels=_names(args.channel) or [],
                           preset=args.preset, overwrite=args.overwrite, chunks=args.chunks, sigma=args.sigma,
                           radius=args.radius, size=args.size, grid=args.grid, kernel_size=kernel,
                           clip_limit=args.clip_limit, resume=args.resume, command=args.command_line)
    print(f"wrote {out}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from l2l_scale.predict import predict

    with _cluster(args, model_step=True, inputs=[args.model, args.input], output=args.output):
        out = predict(args.model, args.input, args.output, channels=_names(args.channel), tile=args.tile,
                      batch=args.batch, dtype=args.dtype, percentiles=args.percentiles, norm_stats=args.norm_stats,
                      norm_scope=args.norm_scope, weights=args.weights, resume=args.resume,
                      overwrite=args.overwrite, chunks=args.chunks, halo=args.halo, precision=args.precision,
                      command=args.command_line)
    print(f"wrote {out}")
    return 0


def _cmd_export_bioimageio(args: argparse.Namespace) -> int:
    from l2l_scale.model.bioimageio import export_bioimageio

    out = export_bioimageio(args.model, args.output, authors=args.author or [], license=args.license,
                            name=args.name, description=args.description, test_image=args.test_image,
                            weights=args.weights, weight_formats=_names(args.weight_formats) or ["keras_hdf5"],
                            overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _cmd_patches(args: argparse.Namespace) -> int:
    from l2l_scale.patches import create_patches

    with _cluster(args, inputs=[args.dataset], output=args.output):
        out = create_patches(
            args.dataset, args.output, preset=args.preset, mode=args.mode,
            input_channels=_names(args.input_channel), target_channels=_names(args.target_channel),
            patch_size=args.patch_size, patches_per_image=args.patches_per_image, augment=args.augment,
            zooms=_floats(args.zooms, None, "--zooms") if args.zooms else None, poisson=args.poisson_noise,
            percentiles=_floats(args.percentiles, 2, "--percentiles") if args.percentiles else None,
            sample_percentiles=args.sample_percentiles,
            norm_stats=args.norm_stats, split_by=args.split_by, validation_fraction=args.validation_fraction,
            seed=args.seed, threshold=args.threshold, foreground=args.foreground, chunk_patches=args.chunk_patches,
            overwrite=args.overwrite, resume=args.resume, command=args.command_line)
    print(f"wrote {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from l2l_scale.train import train

    out = train(args.patches, args.model_dir, args.config, preset=args.preset, resume=args.resume,
                overwrite=args.overwrite, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                batch_size=args.batch_size, learning_rate=args.learning_rate, loss=args.loss,
                ssim_weights=list(_floats(args.ssim_weights, None, "--ssim-weights")) if args.ssim_weights else None,
                ssim_filter_size=args.ssim_filter_size, unet_n_depth=args.unet_depth,
                unet_kern_size=args.unet_kern_size, unet_n_first=args.unet_n_first, unet_residual=args.residual,
                early_stopping=args.early_stopping, strategy=args.strategy, seed=args.seed,
                tensorboard=args.tensorboard, precision=args.precision, command=args.command_line)
    print(f"wrote {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from l2l_scale.demo import run_demo

    run_demo(out=args.out, size=args.size, epochs=args.epochs, overwrite=args.overwrite, command=args.command_line,
             cluster_args=dict(workers=args.workers, threads_per_worker=args.threads_per_worker,
                               memory_limit=args.memory_limit, scheduler=args.scheduler,
                               cluster_file=args.cluster))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from l2l_scale.evaluate.evaluate import evaluate, format_table, parse_method

    methods = dict(parse_method(m) for m in args.method)
    if len(methods) != len(args.method):
        raise ConfigError("two --method options have the same name; name each restoration, e.g. --method l2l=A.zarr")
    models = {}
    for m in args.model:
        name, sep, path = m.partition("=")
        models[name if sep else Path(m).name] = path if sep else m
    with _cluster(args):
        out = evaluate(args.target, methods, args.output, input=args.input, truth=args.truth,
                       normalize=args.normalize, percentiles=_floats(args.percentiles, 2, "--percentiles"),
                       patches=args.patches, patch_size=args.patch_size, seed=args.seed, threshold=args.threshold,
                       data_range=args.data_range, smooth=args.smooth, rms_sigma=args.rms_sigma,
                       contrast_top_fraction=args.contrast_top_fraction,
                       contrast_percentiles=_floats(args.contrast_percentiles, 2, "--contrast-percentiles"),
                       models=models or None, crossval=args.crossval, chunks=args.chunks, overwrite=args.overwrite,
                       command=args.command_line)
    rows = json.loads((Path(out) / "evaluation.json").read_text())["metrics"]
    print(format_table(rows))
    print(f"wrote {out} (report: l2l-scale report {out})")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from l2l_scale.evaluate.report import report

    crop = tuple(int(v) for v in _floats(args.crop, 2, "--crop")) if args.crop else None
    out = report(args.results, args.out, crop_size=args.crop_size, crop=crop, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _cmd_crossval(args: argparse.Namespace) -> int:
    from l2l_scale.evaluate.crossval import format_crossval_table, plan_crossval, run_crossval

    # Plan first: option and dataset errors (fewer pairs than folds, ...) fail before a cluster starts.
    plan = plan_crossval(
        args.dataset, args.out_dir, input_channels=_names(args.input_channel),
        target_channels=_names(args.target_channel), reference_channel=args.reference_channel, mode=args.mode,
        preset=args.preset, folds=args.folds, pairs=args.pairs, repeats=args.repeats,
        epochs_per_pair=args.epochs_per_pair, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
        learning_rate=args.learning_rate, loss=args.loss, unet_n_depth=args.unet_depth,
        unet_n_first=args.unet_n_first, unet_kern_size=args.unet_kern_size, patch_size=args.patch_size,
        patches_per_image=args.patches_per_image, augment=args.augment,
        percentiles=_floats(args.percentiles, 2, "--percentiles") if args.percentiles else None,
        smooth=args.smooth, tile=args.tile, strategy=args.strategy, seed=args.seed, resume=args.resume,
        overwrite=args.overwrite, keep_work=args.keep_work, precision=args.precision, command=args.command_line)
    with _cluster(args, model_step=True, inputs=[args.dataset]):
        result = run_crossval(plan)
    print(format_crossval_table(result["summary"]))
    print(f"trained {len(result['trained'])} of {plan.n_folds_total} folds ({len(result['skipped'])} were already "
          f"finished); wrote {result['path']} and {result['csv']}")
    return 0
