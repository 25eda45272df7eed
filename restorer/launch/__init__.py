"""Running a job: on an embedded single-node Ray here (``local``), or on a cluster through the
Ray Jobs API (``submit``), and following it.

Modules: ``local`` < ``submit``.
"""

from restorer import faces

HOMES = {
    "load_spec": "local",
    "run_spec": "local",
}
__getattr__ = faces(__name__, HOMES)
__all__ = sorted(HOMES)
