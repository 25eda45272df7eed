"""Running a job spec: in this process on an embedded or connected Ray.

``restorer run SPEC`` is the one entrypoint: ``restorer restore``/``train`` build the same spec
from flags, and a job submitted to a cluster runs ``restorer run SPEC`` there.
"""

from __future__ import annotations

from typing import Any

from restorer.errors import SpecError
from restorer.job import specs


def load_spec(path: str) -> Any:
    """Load a job spec of any kind (:data:`restorer.job.specs.SPEC_KINDS`)."""
    return specs.load_spec(path)


def run_spec(spec: Any) -> dict[str, Any]:
    """Run ``spec`` to the end and return its summary."""
    if spec.kind == "restore":
        from restorer.pipeline import run_restore

        return run_restore(spec)
    if spec.kind == "train":
        from restorer.train.distributed import run_train

        return run_train(spec)
    raise SpecError(f"Unknown job kind {spec.kind!r}")
