"""``restorer restore``, ``restorer run`` and ``restorer train``: run a job from this process
(on an embedded Ray, or on the cluster at ``--address``)."""

from __future__ import annotations

import json

import click

from restorer.cli.base import (
    duration,
    errors_to_exit_codes,
    finish,
    json_option,
    main,
    num_cpus_option,
    override_options,
    resource_options,
)
from restorer.errors import SpecError
from restorer.job import specs


@main.command()
@click.argument("uris", nargs=-1, metavar="INPUT... OUTPUT")
@click.option("--manifest", default=None, help="Restore the URIs listed in this Parquet (uri, "
              "key columns) or text manifest instead of an INPUT folder.")
@click.option("--layout", type=click.Choice(["files", "parquet"]), default=None,
              help="Output layout: one file per image (default) or Parquet shards.")
@click.option("--model", default=None, help="Zoo name or .safetensors path (default model if "
              "omitted); see `restorer models`.")
@click.option("--tile", type=int, default=None, help="Tile side in pixels (0 = whole images).")
@click.option("--overlap", type=int, default=None, help="Tile overlap (default: receptive field).")
@click.option("--format", type=click.Choice(["same", "png", "jpeg", "webp", "tiff"]),
              default=None, help="Output format (default: same as the input).")
@click.option("--quality", "--jpeg-quality", "jpeg_quality", type=click.IntRange(0, 100),
              default=None, help="JPEG/WebP quality 1..100 (default 0: a JPEG input's own "
              "quality, read from its quantisation tables and raised to keep the restoration; "
              "95 for other inputs).")
@click.option("--subsampling", "jpeg_subsampling",
              type=click.Choice(["same", "4:4:4", "4:2:2", "4:2:0"]), default=None,
              help="JPEG chroma subsampling (default same: a JPEG input's own; else 4:4:4).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default=None,
              help="auto (default): bf16 autocast on GPUs and on CPUs with native bf16 "
                   "(AVX512-BF16, AMX; ~2x faster, within 0.01 dB), else fp32.")
@click.option("--strength", type=float, default=None,
              help="Noise-aware models (restore-default): scale of the noise they remove, 0 "
                   "keeps the grain, 1 (default) what they measure, up to 3 cleans harder; "
                   "other models: 0..1 blend with the input.")
@click.option("--flat-fill", type=click.Choice(["auto", "on", "off"]), default=None,
              help="Fill clean flat regions (frames, clipped areas) with the image's noise "
                   "before a blind denoiser, so the photo beside them is denoised too "
                   "(default auto: for models trained to denoise).")
@click.option("--limit", type=int, default=None, help="Restore at most N inputs.")
@click.option("--include", multiple=True, help="Glob on relative keys to include (repeatable).")
@click.option("--exclude", multiple=True, help="Glob on relative keys to exclude (repeatable).")
@click.option("--overwrite", is_flag=True, default=None, help="Redo everything.")
@click.option("--retry-failed", is_flag=True, default=None, help="Redo quarantined inputs.")
@click.option("--max-pixels", type=int, default=None, help="Quarantine larger images.")
@click.option("--batch-size", type=int, default=None, help="Images per actor call.")
@click.option("--shared-filesystem", is_flag=True, default=None,
              help="Local INPUT/OUTPUT paths are on a file system every node of the cluster "
                   "mounts at the same path (checked at start); needed for local paths with "
                   "--address on a multi-node cluster.")
@num_cpus_option
@click.option("--object-store-mb", type=int, default=None, help="Embedded Ray: object store.")
@click.option("--dry-run", is_flag=True, help="Count inputs and estimate time; restore nothing.")
@resource_options
@json_option
@errors_to_exit_codes
def restore(uris, manifest, layout, include, exclude, dry_run, as_json, **fields):
    """Restore every image under INPUT (or in --manifest) into OUTPUT, under the same keys.

    INPUT is a folder, an s3:// prefix, a prefix of Parquet shards (detected), or one or more
    image files (written under their names, or their paths below the files' common folder).
    """
    # ``fields``: the options named as fields of the restore spec (restorer.job.specs.RestoreSpec),
    # from --model to --address; those not given are None and keep the spec's defaults.
    from restorer.launch.local import run_spec

    if manifest and len(uris) != 1 or not manifest and len(uris) < 2:
        raise click.UsageError("give INPUT and OUTPUT (INPUT: a folder, a prefix, or one or "
                               "more image files), or --manifest URI and OUTPUT")
    if manifest:
        input_uri, output_uri = manifest, uris[0]
    else:
        output_uri = uris[-1]
        input_uri, picked = specs.input_from_files(list(uris[:-1]))
        include = include + picked
    spec = specs.spec_from_flags(
        specs.RestoreSpec, input=input_uri, output=output_uri, include=list(include) or None,
        exclude=list(exclude) or None, **fields)
    if manifest:
        spec = specs.replace_field(spec, "input", "layout", "manifest")
    if layout:
        spec = specs.replace_field(spec, "output", "layout", layout)
    if dry_run:
        from restorer.quality.forecast import forecast_job

        plan = forecast_job(spec, fields["workers"] or 1)
        if as_json:
            click.echo(json.dumps(plan, indent=2))
            return
        click.echo(f"{plan['images']} images ({plan['layout']} layout, {plan['input_bytes']} "
                   f"bytes), ~{plan['megapixels']:.1f} megapixels (mean "
                   f"{plan['mean_megapixels']:.3f} MP over {plan['sampled']} sampled)")
        if "estimated_seconds" in plan:
            busy = (f" ({plan['busy_workers']} with images)"
                    if plan["busy_workers"] < plan["workers"] else "")
            startup = (f"{duration(plan['startup_seconds'])} of start-up and "
                       if plan["startup_seconds"] else "")
            more = "" if plan["startup_seconds"] is not None else " plus the actors' start-up"
            click.echo(f"estimated {duration(plan['estimated_seconds'])} ({startup}"
                       f"{duration(plan['work_seconds'])} of restoring{more}) on "
                       f"{plan['workers']} worker{'s' if plan['workers'] != 1 else ''}{busy}"
                       + (f", {plan['gpu_hours']:.2f} GPU-hours" if plan["gpu_hours"] else "")
                       + f"; calibrated on {plan['calibration_from']}")
        else:
            click.echo(plan["estimate"])
        return
    finish(run_spec(spec), as_json)


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@override_options
@resource_options
@json_option
@errors_to_exit_codes
def run(spec_path, input_uri, output_uri, model, limit, quality, workers, gpus_per_worker,
        address, as_json):
    """Run the job in a TOML spec file (kind = "restore" or "train")."""
    from restorer.launch.local import load_spec, run_spec

    spec = load_spec(spec_path)
    spec = specs.apply_overrides(spec, input=input_uri, output=output_uri, model=model,
                                limit=limit, quality=quality, workers=workers,
                                gpus_per_worker=gpus_per_worker,
                                address=address)
    finish(run_spec(spec), as_json)


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@resource_options
@json_option
@errors_to_exit_codes
def train(spec_path, workers, gpus_per_worker, address, as_json):
    """Train a restoration net with Ray Train (DDP) from a kind = "train" SPEC.

    Rerunning the same spec (same name and storage path) resumes from the latest checkpoint.
    """
    from restorer.launch.local import load_spec, run_spec

    spec = load_spec(spec_path)
    if spec.kind != "train":
        raise SpecError(f"{spec_path} is a {spec.kind!r} spec; use `restorer run` for it")
    spec = specs.apply_overrides(spec, workers=workers, gpus_per_worker=gpus_per_worker,
                                address=address)
    summary = run_spec(spec)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    final = summary["final"]
    click.echo(f"trained {summary['name']} to step {summary['steps']} in "
               f"{summary['elapsed_seconds']:.0f} s: loss {final['loss']:.4f}"
               + (f", validation PSNR {final['val_psnr']:.2f} dB (input "
                  f"{final['val_input_psnr']:.2f} dB)" if "val_psnr" in final else ""))
    click.echo(f"model: {summary['model']}  (restorer restore IN OUT --model {summary['model']})")
    click.echo(f"history: {summary['history']}")
