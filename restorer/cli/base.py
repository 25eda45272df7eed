"""What every ``restorer`` command shares: exit codes, the error mapping, the shared options,
the summary printer and the ``main`` group that the command modules register on.

Exit codes: 0 done; 1 the job failed (``RestorerError``); 2 bad usage or spec; 3 the job
finished but some images were quarantined (see ``OUTPUT/_restorer/errors.parquet``); 4 the job
was stopped (SIGTERM) after draining, and a rerun resumes it; 5 the job is incomplete: some
units still failed transiently (storage outage, device errors) after retries, or hold inputs
that vanished, and were not committed; a plain rerun redoes exactly those.

Options that several commands take are declared once below (``json_option``,
``worker_options``, ``resource_options``, ``override_options``, ``num_cpus_option``,
``dashboard_option``). Names: ``specs`` is :mod:`restorer.job.specs` (the job spec dataclasses);
``jobs_api`` is :mod:`restorer.launch.submit` (the Ray Jobs API client), which the ``restorer
submit`` command and the ``restorer jobs`` group drive.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import textwrap
from typing import Any

import click

from restorer.errors import JobStopped, RestorerError, SpecError

EXIT_USAGE = 2
EXIT_FAILED_IMAGES = 3
EXIT_STOPPED = 4
EXIT_INCOMPLETE = 5


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def errors_to_exit_codes(command):
    """Map library errors to Click's: spec errors exit 2, other restorer errors exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SpecError as e:  # bad spec, flag, model name, input or resources: exit 2
            click.echo(f"Error: {e}", err=True)
            sys.exit(EXIT_USAGE)
        except JobStopped as e:  # asked for: a calm paragraph, the command to resume
            message = str(e).replace("rerun the same command.", "run:")
            # wrapped between words only: paths and names in it stay whole (samples-denoise/)
            text = textwrap.fill(message, width=100, break_on_hyphens=False,
                                 break_long_words=False)
            click.echo(f"\n{text}\n    {resume_command()}", err=True)
            sys.exit(EXIT_STOPPED)
        except RestorerError as e:
            raise click.ClickException(str(e)) from e

    return wrapper


def resume_command() -> str:
    """The command line this process was started with, as a user would type it again."""
    import os
    import shlex

    program = os.path.basename(sys.argv[0]) if sys.argv else "restorer"
    if program in ("__main__.py", "-c") or not program:
        program = "restorer"
    return shlex.join([program, *sys.argv[1:]])


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
                 help="Ray cluster address; 'auto': the cluster `ray start` made on this "
                      "machine (default: a new embedded local Ray of this job's own, even "
                      "where other Rays run)."))
# Overrides of a spec file's fields: `restorer run` and `restorer submit`.
override_options = _options(
    click.option("--input", "input_uri", default=None, help="Override input.uri."),
    click.option("--output", "output_uri", default=None, help="Override output.uri."),
    click.option("--model", default=None, help="Override the model."),
    click.option("--limit", type=int, default=None, help="Override input.limit."),
    click.option("--quality", type=click.IntRange(0, 100), default=None,
                 help="Override output.jpeg_quality (0 = match a JPEG input's quality)."))
# The cluster a `restorer submit` / `restorer jobs ...` command talks to.
dashboard_option = click.option(
    "--address", default=None,
    help="Ray dashboard / Jobs API URL, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS).")


def rate(value: float | None) -> str:
    return "no rate" if value is None else f"{value:.2f} images/s"


def print_summary(summary: dict[str, Any], as_json: bool) -> None:
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
        line += f", {rate(summary['images_per_second'])}"
        steady, startup = summary.get("steady_images_per_second"), summary.get("startup_seconds")
        if steady is not None:
            line += f" ({rate(steady)} after a start-up of {startup:.1f} s)"
        elif startup is not None:
            line += f" (the first results came after {startup:.1f} s)"
    click.echo(line)
    job = summary.get("job")
    if job and summary["skipped"]:
        click.echo(f"whole job so far: {job['succeeded']} restored, {job['failed']} failed, "
                   f"of {job['records']} inputs recorded")
    if summary["errors_by_class"]:
        click.echo("errors: " + ", ".join(f"{k} x{v}" for k, v in
                                          summary["errors_by_class"].items()))
    if summary.get("skipped_non_images"):
        click.echo(non_images_line(summary))
    flagged = summary.get("flagged") or []
    if flagged:
        click.echo(f"{len(flagged)} images changed far more than the rest; check first: "
                   + ", ".join(f["key"] for f in flagged[:5]))
    click.echo(f"model {summary['model']} (sha256 {summary['model_sha256'][:12]})")
    if summary.get("report"):
        click.echo(f"report: {summary['report']}")
    click.echo(f"details: {summary.get('output', '').rstrip('/')}/_restorer/")


def non_images_line(summary: dict[str, Any]) -> str:
    """What a summary says of the input's files that were not images (skipped by extension)."""
    count = summary.get("skipped_non_images")
    if count is None:
        return "non-image files: not counted (counted for local folders)"
    if not count:
        return "non-image files: none"
    examples = summary.get("non_image_examples") or []
    more = ", ..." if count > len(examples) else ""
    return (f"non-image files skipped (extension not in input.extensions): {count}: "
            + ", ".join(examples) + more)


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def finish(summary: dict[str, Any], as_json: bool) -> None:
    print_summary(summary, as_json)
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
    setup_logging(verbose)
    if not verbose:
        from restorer.job.console import quiet_ray

        quiet_ray()
