"""What every job shares, without Ray: its spec (frozen dataclasses loaded from TOML), its
progress bar, the console filter of Ray's noise and the sizing of its workers.

Modules: ``specs`` (RestoreSpec, TrainSpec, TOML and flags), ``progress`` < ``console``;
``sizing`` (workers and threads from a cluster's shape).
"""

from restorer import faces

HOMES = {
    "RestoreSpec": "specs",
    "TrainSpec": "specs",
    "spec_from_flags": "specs",
    "spec_from_dict": "specs",
    "spec_to_dict": "specs",
    "Progress": "progress",
    "quiet_ray": "console",
    "size_workers": "sizing",
    "WorkerPlan": "sizing",
}
__getattr__ = faces(__name__, HOMES)
__all__ = sorted(HOMES)
