"""What a run of a restore job did: the driver's counters (:class:`JobState`), fed one record
at a time (:func:`account`), and the summary made from them (:func:`summarize`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from restorer.job.specs import RestoreSpec, spec_to_dict
from restorer.output.digest import Digest


@dataclass
class JobState:
    spec: RestoreSpec
    model_uri: str
    model_sha256: str
    fingerprint: dict[str, Any]
    started: float = field(default_factory=time.time)
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    skipped_units: int = 0
    committed_units: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    megapixels: float = 0.0
    first_result: float | None = None  # when the first records reached the driver
    first_count: int = 0  # records in that first batch
    last_result: float | None = None
    arrivals: int = 0  # batches of processed records that reached the driver
    errors_by_class: dict[str, int] = field(default_factory=dict)
    notes: int = 0
    replaced: int = 0  # outputs found already written (in units a crash left uncommitted)
    abandoned: int = 0  # images in units left open by a stop
    committed_images: int = 0  # images in the units this run committed
    in_flight_written: int | None = None  # after a stop: outputs written in uncommitted units
    retries: int = 0  # transient failures retried (reads, writes) in this run
    transient: int = 0  # images still failing transiently: their units stay for the next run
    missing: int = 0  # inputs that vanished: their units wait MISSING_RUNS runs, then commit
    incomplete_units: int = 0  # units left uncommitted for those
    transient_units: set[str] = field(default_factory=set)  # units with a transient history
    digest: Digest = field(default_factory=Digest)  # what this run committed, in brief
    # files of a local input folder left out as not images (by extension), and a few of their
    # names; None where they were not counted (S3 prefixes, shards, manifests)
    non_images: int | None = None
    non_image_examples: tuple[str, ...] = ()


def account(state: JobState, record: dict[str, Any]) -> None:
    state.input_bytes += record["in_bytes"]
    state.retries += record["retries"]
    if record["status"] == "ok":
        state.succeeded += 1
        state.output_bytes += record["out_bytes"]
        state.megapixels += record["width"] * record["height"] / 1e6
    elif record["status"] == "transient":
        state.transient += 1
    elif record["status"] == "missing":
        state.missing += 1
    else:
        state.failed += 1
        state.errors_by_class[record["error_class"]] = (
            state.errors_by_class.get(record["error_class"], 0) + 1)
    state.notes += bool(record["note"])
    state.replaced += record["replaced"]


STEADY_MIN_ARRIVALS = 3  # batches of results (the first included) for a steady rate
STEADY_MIN_SECONDS = 0.25  # ... spread over at least this: closer together they are one burst


def steady_rate(state: JobState, elapsed: float) -> float | None:
    """Images per second after start-up: from the first records that reached the driver to
    the last, the first batch not counted. None when that says nothing about the pace: one
    batch, or results that came in one burst (fewer than :data:`STEADY_MIN_ARRIVALS` batches,
    or spread over under :data:`STEADY_MIN_SECONDS`), as when every image arrives at once at
    the end."""
    processed = state.succeeded + state.failed
    if state.first_result is None or state.last_result is None:
        return None
    span = state.last_result - state.first_result
    if (processed <= state.first_count or state.arrivals < STEADY_MIN_ARRIVALS
            or span < STEADY_MIN_SECONDS):
        return None
    return round((processed - state.first_count) / span, 3)


def summarize(state: JobState, elapsed: float) -> dict[str, Any]:
    """The run's figures. Rates count the images this run processed (restored or failed), not
    the units it skipped; a run that processed none has no rate (``None``). Start-up runs to
    the first processed records (:func:`steady_rate` for the rate after it)."""
    processed = state.succeeded + state.failed
    steady = steady_rate(state, elapsed)
    status = "failed_images" if state.failed else "ok"
    if state.incomplete_units:
        status = "incomplete"
    return {
        "status": status,
        "total": state.total, "succeeded": state.succeeded, "failed": state.failed,
        "skipped": state.skipped, "skipped_units": state.skipped_units,
        "committed_units": state.committed_units,
        "elapsed_seconds": round(elapsed, 3),
        "startup_seconds": (round(state.first_result - state.started, 3)
                            if state.first_result is not None else None),
        "images_per_second": round(processed / elapsed, 3) if processed and elapsed > 0 else None,
        "steady_images_per_second": steady,
        "megapixels": round(state.megapixels, 3), "input_bytes": state.input_bytes,
        "output_bytes": state.output_bytes, "errors_by_class": state.errors_by_class,
        "images_with_notes": state.notes,
        "replaced_outputs": state.replaced, "abandoned_images": state.abandoned,
        "in_flight_written": state.in_flight_written,
        "retries": state.retries, "transient_failures": state.transient,
        "missing_inputs": state.missing, "incomplete_units": state.incomplete_units,
        "skipped_non_images": state.non_images,
        "non_image_examples": list(state.non_image_examples),
        "model": state.model_uri, "model_sha256": state.model_sha256,
        "fingerprint": state.fingerprint, "spec": spec_to_dict(state.spec),
        "input": state.spec.input.uri, "output": state.spec.output.uri,
    }
