"""``restorer submit`` and the ``restorer jobs`` group: jobs on a Ray cluster through its Jobs
API (:mod:`restorer.launch.submit`, imported as ``jobs_api``)."""

from __future__ import annotations

import json
import sys

import click

from restorer.cli.base import (
    EXIT_STOPPED,
    dashboard_option,
    errors_to_exit_codes,
    main,
    override_options,
    worker_options,
)


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
@errors_to_exit_codes
def submit(spec_path, address, input_uri, output_uri, model, limit, quality, workers,
           gpus_per_worker, pip, follow):
    """Submit SPEC to a Ray cluster through the Jobs API (entrypoint: restorer run SPEC)."""
    from restorer.launch import submit as jobs_api

    job_id = jobs_api.submit(spec_path, address, overrides={
        "input": input_uri, "output": output_uri, "model": model, "limit": limit,
        "quality": quality, "workers": workers, "gpus_per_worker": gpus_per_worker}, pip=list(pip) or None)
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
@errors_to_exit_codes
def jobs_list(address):
    """The cluster's jobs, newest last."""
    from restorer.launch import submit as jobs_api

    for job in jobs_api.list_jobs(address):
        click.echo(f"{job.job_id}  {job.status:9s}  {job.metadata.get('kind', '-'):7s}  "
                   f"{job.metadata.get('name', '')}")


@jobs_group.command("status")
@click.argument("job_id")
@dashboard_option
@errors_to_exit_codes
def jobs_status(job_id, address):
    """One job's status, message, exit code and metadata."""
    from restorer.launch import submit as jobs_api

    job = jobs_api.job_status(address, job_id)
    click.echo(json.dumps({"job_id": job.job_id, "status": job.status, "message": job.message,
                           "driver_exit_code": job.driver_exit_code,
                           "metadata": job.metadata}, indent=2))


@jobs_group.command("logs")
@click.argument("job_id")
@dashboard_option
@click.option("--follow", is_flag=True, help="Stream until the job ends.")
@errors_to_exit_codes
def jobs_logs(job_id, address, follow):
    """A job's logs."""
    from restorer.launch import submit as jobs_api

    for chunk in jobs_api.job_logs(address, job_id, follow=follow):
        click.echo(chunk, nl=False)


@jobs_group.command("stop")
@click.argument("job_id")
@dashboard_option
@click.option("--wait", type=float, default=0.0, help="Seconds to wait for it to stop.")
@errors_to_exit_codes
def jobs_stop(job_id, address, wait):
    """Stop a job: SIGTERM, so a restore drains and commits its finished units."""
    from restorer.launch import submit as jobs_api

    click.echo(jobs_api.stop_job(address, job_id, wait=wait).status)
