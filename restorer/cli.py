"""The ``restorer`` command: thin Click commands over the library.

Exit codes: 0 done; 1 the job failed (``RestorerError``); 2 bad usage or spec; 3 the job
finished but some images were quarantined (see ``OUTPUT/_restorer/errors.parquet``); 4 the job
was stopped (SIGTERM) after draining, and a rerun resumes it; 5 the job is incomplete: some
units still failed transiently (storage outage, device errors) after retries, or hold inputs
that vanished, and were not committed; a plain rerun redoes exactly those.

Options that several commands take are declared once below (``json_option``,
``worker_options``, ``resource_options``, ``override_options``, ``num_cpus_option``,
``dashboard_option``). Names: ``specs`` is :mod:`restorer.jobs` (the job spec dataclasses);
``jobs_api`` is :mod:`restorer.submit` (the Ray Jobs API client), which the ``restorer
submit`` command and the ``restorer jobs`` group drive.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from typing import Any

import click

from restorer import jobs as specs
from restorer.errors import JobStopped, RestorerError, SpecError

EXIT_USAGE = 2
EXIT_FAILED_IMAGES = 3
EXIT_STOPPED = 4
EXIT_INCOMPLETE = 5


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _errors_to_exit_codes(command):
    """Map library errors to Click's: spec errors exit 2, other restorer errors exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SpecError as e:  # bad spec, flag, model name, input or resources: exit 2
            click.echo(f"Error: {e}", err=True)
            sys.exit(EXIT_USAGE)
        except JobStopped as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(EXIT_STOPPED)
        except RestorerError as e:
            raise click.ClickException(str(e)) from e

    return wrapper


def _options(*decorators):
    """One decorator applying ``decorators`` (options, or groups of them) in the order given,
    which is the order ``--help`` lists them in."""

    def decorate(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return decorate


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print the result as JSON (for scripts).")
num_cpus_option = click.option("--num-cpus", type=int, default=None,
                               help="Embedded Ray: CPUs to use.")
# The workers a job asks for: `restorer restore/run/train` and `restorer submit`.
worker_options = _options(
    click.option("--workers", type=int, default=None,
                 help="Restore actors or train workers (default: sized from the cluster)."),
    click.option("--gpus-per-worker", type=float, default=None,
                 help="GPUs per worker; 0 = CPU, fractions allowed (default: 1 if the "
                      "cluster has GPUs, else 0)."))
# Every command that runs work on Ray from this process.
resource_options = _options(
    worker_options,
    click.option("--address", default=None,
                 help="Ray cluster address (default: an embedded local Ray)."))
# Overrides of a spec file's fields: `restorer run` and `restorer submit`.
override_options = _options(
    click.option("--input", "input_uri", default=None, help="Override input.uri."),
    click.option("--output", "output_uri", default=None, help="Override output.uri."),
    click.option("--model", default=None, help="Override the model."),
    click.option("--limit", type=int, default=None, help="Override input.limit."))
# The cluster a `restorer submit` / `restorer jobs ...` command talks to.
dashboard_option = click.option(
    "--address", default=None,
    help="Ray dashboard / Jobs API URL, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS).")


def _rate(value: float | None) -> str:
    return "no rate" if value is None else f"{value:.2f} images/s"


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    if summary.get("kind") == "train":
        click.echo(json.dumps({k: v for k, v in summary.items() if k != "spec"}, indent=2))
        return
    if summary.get("status") == "empty":
        click.echo(f"no images found under {summary.get('input') or 'the input'} "
                   "(check the path, --include/--exclude and input.extensions)")
        return
    processed = summary["succeeded"] + summary["failed"]
    line = (f"\nrestored {summary['succeeded']} of {summary['total']} images "
            f"({summary['failed']} failed, {summary['skipped']} skipped as already done) "
            f"in {summary['elapsed_seconds']:.1f} s")
    if processed:
        line += (f", {_rate(summary['images_per_second'])} "
                 f"({_rate(summary['steady_images_per_second'])} after start-up)")
    click.echo(line)
    job = summary.get("job")
    if job and summary["skipped"]:
        click.echo(f"whole job so far: {job['succeeded']} restored, {job['failed']} failed, "
                   f"of {job['records']} inputs recorded")
    if summary["errors_by_class"]:
        click.echo("errors: " + ", ".join(f"{k} x{v}" for k, v in
                                          summary["errors_by_class"].items()))
    flagged = summary.get("flagged") or []
    if flagged:
        click.echo(f"{len(flagged)} images changed far more than the rest; check first: "
                   + ", ".join(f["key"] for f in flagged[:5]))
    click.echo(f"model {summary['model']} (sha256 {summary['model_sha256'][:12]})")
    if summary.get("report"):
        click.echo(f"report: {summary['report']}")
    click.echo(f"details: {summary.get('output', '').rstrip('/')}/_restorer/")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _finish(summary: dict[str, Any], as_json: bool) -> None:
    _print_summary(summary, as_json)
    if summary.get("status") == "incomplete":
        if not as_json:
            click.echo(f"incomplete: {summary['incomplete_units']} units were not committed "
                       f"({summary['transient_failures']} images still failing transiently, "
                       f"{summary['missing_inputs']} inputs missing); rerun the same command "
                       "to finish them", err=True)
        sys.exit(EXIT_INCOMPLETE)
    if summary.get("failed"):
        sys.exit(EXIT_FAILED_IMAGES)


@click.group()
@click.option("-v", "--verbose", is_flag=True,
              help="Debug logging, and Ray's own console output unfiltered.")
@click.version_option(package_name="restorer")
def main(verbose: bool) -> None:
    """Restore images with CNNs on Ray: locally, or on a cluster."""
    _setup_logging(verbose)
    if not verbose:
        from restorer.console import quiet_ray

        quiet_ray()


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
@click.option("--format", "fmt", type=click.Choice(["same", "png", "jpeg", "webp", "tiff"]),
              default=None, help="Output format (default: same as the input).")
@click.option("--jpeg-quality", type=int, default=None)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default=None)
@click.option("--strength", type=float, default=None, help="0..1 blend with the input.")
@click.option("--limit", type=int, default=None, help="Restore at most N inputs.")
@click.option("--include", multiple=True, help="Glob on relative keys to include (repeatable).")
@click.option("--exclude", multiple=True, help="Glob on relative keys to exclude (repeatable).")
@click.option("--overwrite", is_flag=True, default=None, help="Redo everything.")
@click.option("--retry-failed", is_flag=True, default=None, help="Redo quarantined inputs.")
@click.option("--max-pixels", type=int, default=None, help="Quarantine larger images.")
@click.option("--batch-size", type=int, default=None, help="Images per actor call.")
@num_cpus_option
@click.option("--object-store-mb", type=int, default=None, help="Embedded Ray: object store.")
@click.option("--dry-run", is_flag=True, help="Count inputs and estimate time; restore nothing.")
@resource_options
@json_option
@_errors_to_exit_codes
def restore(uris, manifest, layout, model, tile, overlap, fmt, jpeg_quality, precision, strength,
            limit, include, exclude, overwrite, retry_failed, max_pixels, batch_size, num_cpus,
            object_store_mb, dry_run, workers, gpus_per_worker, address, as_json):
    """Restore every image under INPUT (or in --manifest) into OUTPUT, under the same keys.

    INPUT is a folder, an s3:// prefix, a prefix of Parquet shards (detected), or one or more
    image files (written under their names, or their paths below the files' common folder).
    """
    from restorer.launch import run_spec

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
        specs.RestoreSpec, input=input_uri, output=output_uri, model=model, tile=tile,
        overlap=overlap, format=fmt, jpeg_quality=jpeg_quality, precision=precision,
        strength=strength, limit=limit, include=list(include) or None,
        exclude=list(exclude) or None, overwrite=overwrite, retry_failed=retry_failed,
        max_pixels=max_pixels, batch_size=batch_size, num_cpus=num_cpus,
        object_store_mb=object_store_mb, workers=workers, gpus_per_worker=gpus_per_worker,
        address=address)
    if manifest:
        spec = specs.replace_field(spec, "input", "layout", "manifest")
    if layout:
        spec = specs.replace_field(spec, "output", "layout", layout)
    if dry_run:
        from restorer.plan import plan_job

        plan = plan_job(spec, workers or 1)
        if as_json:
            click.echo(json.dumps(plan, indent=2))
            return
        click.echo(f"{plan['images']} images ({plan['layout']} layout, {plan['input_bytes']} "
                   f"bytes), ~{plan['megapixels']:.1f} megapixels (mean "
                   f"{plan['mean_megapixels']:.3f} MP over {plan['sampled']} sampled)")
        if "estimated_seconds" in plan:
            click.echo(f"estimated {_duration(plan['estimated_seconds'])} on {plan['workers']} "
                       f"worker{'s' if plan['workers'] != 1 else ''}"
                       + (f" ({plan['gpu_hours']:.2f} GPU-hours)" if plan["gpu_hours"] else "")
                       + f", calibrated on {plan['calibration_from']}")
        else:
            click.echo(plan["estimate"])
        return
    _finish(run_spec(spec), as_json)


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@override_options
@resource_options
@json_option
@_errors_to_exit_codes
def run(spec_path, input_uri, output_uri, model, limit, workers, gpus_per_worker, address,
        as_json):
    """Run the job in a TOML spec file (kind = "restore" or "train")."""
    from restorer.launch import load_spec, run_spec

    spec = load_spec(spec_path)
    spec = specs.apply_overrides(spec, input=input_uri, output=output_uri, model=model,
                                limit=limit, workers=workers, gpus_per_worker=gpus_per_worker,
                                address=address)
    _finish(run_spec(spec), as_json)


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@resource_options
@json_option
@_errors_to_exit_codes
def train(spec_path, workers, gpus_per_worker, address, as_json):
    """Train a restoration net with Ray Train (DDP) from a kind = "train" SPEC.

    Rerunning the same spec (same name and storage path) resumes from the latest checkpoint.
    """
    from restorer.launch import load_spec, run_spec

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


@main.command("eval")
@click.option("--model", default=None, help="Zoo name or model path (default model if omitted).")
@click.option("--data", "data_dir", required=True, help="Folder of clean test images.")
@click.option("--task", type=click.Choice(["denoise", "jpeg", "sr"]), default="denoise")
@click.option("--sigma", type=float, default=25.0, help="denoise: noise std, 0-255 scale.")
@click.option("--quality", type=int, default=None, help="jpeg: JPEG quality.")
@click.option("--scale", type=int, default=None, help="sr: downscale factor.")
@click.option("--baseline", type=click.Choice(["nlm", "bm3d"]), default=None,
              help="Add a classical denoiser told the true sigma (denoise only) to the table: "
                   "scikit-image non-local means, or BM3D/CBM3D (pip install "
                   "'restorer[baseline]'; slow: seconds per image).")
@click.option("--trim", default="0x0", show_default=True, metavar="ROWSxCOLUMNS",
              help="Cut rows off the bottom and columns off the right of every image first, "
                   "e.g. 1x3 makes Set12 255x253 and 511x509 (sides not multiples of 8).")
@click.option("--edges", is_flag=True,
              help="Also measure the outermost 16 px on all sides against the pixels at "
                   "least 32 px from every side (band / interior PSNR).")
@click.option("--frame", type=click.Choice(["black", "gray"]), default=None,
              help="Place each image in a clean 48 px frame (black, or mid-gray 128), degrade "
                   "inside only, and measure the 24 px next to the frame against the rest.")
@click.option("--through", type=click.Choice(["net", "actor"]), default="net",
              show_default=True,
              help="net: the bare net on the whole unclipped image; actor: what `restorer "
                   "restore` writes (the degraded image saved as 8-bit, the actor's tiles and "
                   "precision).")
@click.option("--tile", type=click.IntRange(min=0), default=256, show_default=True,
              help="--through actor: tile size (0 = whole images), as `restorer restore`.")
@click.option("--sheet", type=click.Path(dir_okay=False), default=None,
              help="Also write a PNG contact sheet (degraded | restored | clean, and zoomed "
                   "crops) of the first images here.")
@click.option("--sheet-rows", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images on the contact sheet.")
@json_option
@_errors_to_exit_codes
def evaluate_command(model, data_dir, task, sigma, quality, scale, baseline, trim, edges, frame,
                     through, tile, sheet, sheet_rows, as_json):
    """Measure a model in the reference conventions (PSNR/SSIM on 8-bit, seeded noise)."""
    from restorer.evaluate import evaluate

    try:
        trim_rows, trim_columns = (int(part) for part in trim.lower().split("x"))
    except ValueError as e:
        raise click.BadParameter(f"expected ROWSxCOLUMNS such as 1x3, got {trim!r}",
                                 param_hint="--trim") from e
    try:
        result = evaluate(model, data_dir, task=task, sigma=sigma, quality=quality, scale=scale,
                          baseline=baseline, sheet=sheet, sheet_rows=sheet_rows,
                          trim=(trim_rows, trim_columns), edges=edges,
                          frame=None if frame is None else {"black": 0, "gray": 128}[frame],
                          through=through, tile=tile)
    except ValueError as e:
        raise SpecError(str(e)) from e
    except OSError as e:  # an unreadable image, or a sheet that cannot be written
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    columns = [("input", "input_psnr"), ("restored", "psnr"), ("ssim", "ssim"),
               ("band", "band_psnr"), ("interior", "interior_psnr"),
               ("baseline", "baseline_psnr"), ("bl band", "baseline_band_psnr"),
               ("bl inter", "baseline_interior_psnr")]
    columns = [(title, key) for title, key in columns if key in result]

    def line(name, values):
        return f"{name[:24]:24s}" + "".join(
            f" {values[key]:9.4f}" if key == "ssim" else f" {values[key]:9.2f}"
            for _, key in columns)

    click.echo(f"{'image':24s}" + "".join(f" {title:>9s}" for title, _ in columns))
    for row in result["rows"]:
        click.echo(line(row["name"], row))
    click.echo(line("mean", result))
    if "band_gap_mean" in result:
        where = "next to the frame" if frame else "along the sides"
        click.echo(f"band {where}: {result['band_gap_mean']:.2f} dB below the interior on "
                   f"average, {result['band_gap_max']:.2f} dB at most"
                   + (f" (baseline: {result['baseline_band_gap_mean']:.2f} dB on average)"
                      if "baseline_band_gap_mean" in result else ""))
    if sheet:
        click.echo(f"contact sheet: {result['sheet']}")


@main.command()
@click.argument("source")
@click.argument("target")
@click.option("--net", "arch", default=None,
              help="Net architecture; default: infer a dncnn layout from the file.")
@click.option("--channels", type=int, default=None)
@click.option("--num-features", type=int, default=None)
@click.option("--num-layers", type=int, default=None)
@click.option("--batch-norm/--no-batch-norm", default=None)
@click.option("--batch-norm-eps", type=float, default=None,
              help="BatchNorm eps where the file does not record it (state dicts).")
@click.option("--key-prefix", default="", help="Strip this prefix from the weight names.")
@_errors_to_exit_codes
def convert(source, target, arch, channels, num_features, num_layers, batch_norm, batch_norm_eps,
            key_prefix):
    """Import published PyTorch weights (.pth) into a restorer model (safetensors).

    Reads state dicts and whole pickled modules (torch.save of either format) without running
    anything from the file; a pickle that would call code is refused. The dncnn layout
    (depth, width, channels, BatchNorm, biases) is inferred from the file, so no shape flags
    are needed; flags that are given must agree with it.
    """
    from restorer.convert import convert_weights

    spec = {"arch": arch or "dncnn"}
    for name, value in (("channels", channels), ("num_features", num_features),
                        ("num_layers", num_layers), ("batch_norm", batch_norm)):
        if value is not None:
            spec[name] = value
    sha = convert_weights(source, target, spec, key_prefix, batch_norm_eps)
    click.echo(f"wrote {target} (sha256 {sha[:12]})")


def _job_exit_code(job) -> int:
    if job.status == "SUCCEEDED":
        return 0
    if job.status == "STOPPED":
        return EXIT_STOPPED
    return job.driver_exit_code if job.driver_exit_code in (1, 2, 3, 4, 5) else 1


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@dashboard_option
@override_options
@worker_options
@click.option("--pip", multiple=True, help="pip requirement to install on a bare cluster "
              "(repeatable).")
@click.option("--follow", is_flag=True, help="Stream the logs and exit with the job's status.")
@_errors_to_exit_codes
def submit(spec_path, address, input_uri, output_uri, model, limit, workers, gpus_per_worker,
           pip, follow):
    """Submit SPEC to a Ray cluster through the Jobs API (entrypoint: restorer run SPEC)."""
    from restorer import submit as jobs_api

    job_id = jobs_api.submit(spec_path, address, overrides={
        "input": input_uri, "output": output_uri, "model": model, "limit": limit,
        "workers": workers, "gpus_per_worker": gpus_per_worker}, pip=list(pip) or None)
    click.echo(f"submitted {job_id}; dashboard {jobs_api.dashboard_url(address)}")
    if follow:
        job = jobs_api.follow(address, job_id, write=lambda chunk: click.echo(chunk, nl=False))
        click.echo(f"\njob {job_id}: {job.status}")
        sys.exit(_job_exit_code(job))


@main.group("jobs")
def jobs_group():
    """List, inspect, follow and stop jobs on a Ray cluster."""


@jobs_group.command("list")
@dashboard_option
@_errors_to_exit_codes
def jobs_list(address):
    """The cluster's jobs, newest last."""
    from restorer import submit as jobs_api

    for job in jobs_api.list_jobs(address):
        click.echo(f"{job.job_id}  {job.status:9s}  {job.metadata.get('kind', '-'):7s}  "
                   f"{job.metadata.get('name', '')}")


@jobs_group.command("status")
@click.argument("job_id")
@dashboard_option
@_errors_to_exit_codes
def jobs_status(job_id, address):
    """One job's status, message, exit code and metadata."""
    from restorer import submit as jobs_api

    job = jobs_api.job_status(address, job_id)
    click.echo(json.dumps({"job_id": job.job_id, "status": job.status, "message": job.message,
                           "driver_exit_code": job.driver_exit_code,
                           "metadata": job.metadata}, indent=2))


@jobs_group.command("logs")
@click.argument("job_id")
@dashboard_option
@click.option("--follow", is_flag=True, help="Stream until the job ends.")
@_errors_to_exit_codes
def jobs_logs(job_id, address, follow):
    """A job's logs."""
    from restorer import submit as jobs_api

    for chunk in jobs_api.job_logs(address, job_id, follow=follow):
        click.echo(chunk, nl=False)


@jobs_group.command("stop")
@click.argument("job_id")
@dashboard_option
@click.option("--wait", type=float, default=0.0, help="Seconds to wait for it to stop.")
@_errors_to_exit_codes
def jobs_stop(job_id, address, wait):
    """Stop a job: SIGTERM, so a restore drains and commits its finished units."""
    from restorer import submit as jobs_api

    click.echo(jobs_api.stop_job(address, job_id, wait=wait).status)


@main.command()
@click.argument("paths", nargs=-1)
@json_option
@_errors_to_exit_codes
def models(paths, as_json):
    """List the bundled models, or describe model files given by path."""
    from restorer.models import DEFAULT_MODEL, describe, zoo

    rows = []
    if paths:
        for path in paths:
            rows.append({"name": path, **describe(path)})
    else:
        for name, entry in zoo().items():
            rows.append({"name": name, "default": name == DEFAULT_MODEL, **describe(str(entry.path)),
                         "card": str(entry.card) if entry.card else None})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no bundled models found")
    for row in rows:
        net = row["net"]
        metrics = row["provenance"].get("metrics", {})
        mark = " (default)" if row.get("default") else ""
        click.echo(f"{row['name']}{mark}: {net.get('arch')} channels={net.get('channels')} "
                   f"{' '.join(f'{k}={v}' for k, v in net.items() if k not in ('arch', 'channels'))}"
                   + (f"  metrics: {json.dumps(metrics)}" if metrics else ""))
        imported = row["provenance"].get("imported")
        if imported:
            click.echo(f"  imported from {imported['source']} (sha256 {imported['sha256'][:12]}, "
                       f"{imported['content']}): {imported['layout']}")
        if row.get("card"):
            click.echo(f"  card: {row['card']}")


@main.command()
@click.argument("output_uri", metavar="OUTPUT")
@json_option
@click.option("--top", type=int, default=10, help="How many top-ranked images to list.")
@click.option("--sort", type=click.Choice(["change_mean", "change_p99", "residual_structure"]),
              default="change_mean", show_default=True,
              help="Rank images by this ledger column (residual_structure: most detail lost).")
@click.option("--report", "rebuild_report", is_flag=True,
              help="(Re)write OUTPUT/_restorer/report.html from the ledger first (a stopped "
                   "job skips it to exit within its grace period).")
@_errors_to_exit_codes
def inspect(output_uri, as_json, top, sort, rebuild_report):
    """Summarise a restore job's OUTPUT: summary, errors, flagged and top-ranked images."""
    from restorer.inspect import inspect_output

    if rebuild_report:
        from restorer.report import write_report

        write_report(output_uri)
    report = inspect_output(output_uri, top, sort=sort)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    summary = report["summary"]
    if summary:
        _print_summary(summary, False)
    click.echo(f"\nrecords: {report['records']} ({report['failed']} failed)")
    click.echo("errors:")
    for row in report["errors"]:
        click.echo(f"  {row['key']}: [{row['stage']}] {row['error_class']}: {row['message']}")
    if not report["errors"]:
        click.echo("  none")

    def structure(row):
        value = row.get("residual_structure")
        return "" if value is None else f", residual structure {value:.3f}"

    click.echo("flagged (changed, or lost structure, far more than the job's typical image):")
    for row in report["flagged"]:
        click.echo(f"  {row['key']}: mean {row['change_mean']:.2f}, p99 {row['change_p99']:.2f}"
                   f"{structure(row)} ({row['reason']})")
    if not report["flagged"]:
        click.echo("  none")
    click.echo(f"top {len(report['most_changed'])} by {report['sort']} (change: |output - "
               "input|, 8-bit levels; residual structure: 0 noise-like .. 1 image structure):")
    for row in report["most_changed"]:
        click.echo(f"  {row['key']}: mean {row['change_mean']:.2f}, p99 {row['change_p99']:.2f}"
                   f"{structure(row)}")
    if not report["most_changed"]:
        click.echo("  none")
    if report.get("report"):
        click.echo(f"report page: {report['report']}")


@main.command()
@click.option("--images", type=int, default=128, show_default=True)
@click.option("--size", type=int, default=256, show_default=True)
@click.option("--model", default=None)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--data", default=None, help="Use these images (one shape) instead of synthetic.")
@num_cpus_option
@json_option
@_errors_to_exit_codes
def bench(images, size, model, batch_size, data, num_cpus, as_json):
    """Measure forward-only ceiling, a naive loop and a restorer job side by side."""
    from restorer.bench import CALIBRATION, run_bench

    result = run_bench(images, size, model, batch_size, data, num_cpus or 0)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{result['images']} images {result['image_shape']} on {result['machine']}, "
               f"model {result['model']}, batch {result['batch_size']}")
    for name in ("ceiling", "naive", "restorer"):
        click.echo(f"  {name:9s} {result[name + '_images_per_second']:9.2f} images/s")
    click.echo(f"  restorer start-up {result['restorer_startup_seconds']:.1f} s (excluded above)")
    click.echo(f"efficiency = restorer / ceiling = {result['efficiency']:.3f}")
    click.echo(f"speedup    = restorer / naive   = {result['speedup']:.3f}")
    click.echo("naive loop, ms per image: " + ", ".join(
        f"{k} {v:.1f}" for k, v in result["naive_stages_ms_per_image"].items()))
    click.echo(f"calibration saved to {CALIBRATION}")


@main.group()
def shard():
    """Pack image files into Parquet shards, or unpack shards into files."""


@shard.command("pack")
@click.argument("source")
@click.argument("target")
@click.option("--rows-per-shard", type=int, default=1000, show_default=True)
@_errors_to_exit_codes
def shard_pack(source, target, rows_per_shard):
    """Pack the images under SOURCE into Parquet shards under TARGET."""
    from restorer.shards import pack

    report = pack(source, target, rows_per_shard)
    click.echo(f"packed {report.files} images ({report.bytes} bytes) into {report.shards} shards")


@shard.command("unpack")
@click.argument("source")
@click.argument("target")
@_errors_to_exit_codes
def shard_unpack(source, target):
    """Write the images in the Parquet shards under SOURCE to files under TARGET."""
    from restorer.shards import unpack

    report = unpack(source, target)
    click.echo(f"unpacked {report.files} images from {report.shards} shards "
               f"({report.skipped} rows skipped: failed or unsafe keys)")


@main.command()
@click.argument("folder")
@click.option("--sigma", type=float, default=25.0, help="Noise level on the 0-255 scale.")
@click.option("--clean", "clean_folder", default=None, help="Also write the clean originals here.")
@_errors_to_exit_codes
def samples(folder, sigma, clean_folder):
    """Write a few noisy synthetic sample images (gray, RGB, RGBA, 16-bit) into FOLDER."""
    from restorer.samples import write_samples

    keys = write_samples(folder, sigma, clean_folder)
    click.echo(f"wrote {len(keys)} sample images to {folder}")


if __name__ == "__main__":
    main()
