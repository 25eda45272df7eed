"""Measuring models and jobs: the evaluations (synthetic degradations and real pairs), the
throughput benchmark that calibrates a host, and the forecast of a job's time and cost.

Modules: ``evaluate`` < ``bench`` < ``forecast``.
"""

from restorer import faces

HOMES = {
    "evaluate_pairs": "evaluate",
    "run_bench": "bench",
    "forecast_job": "forecast",
}
__getattr__ = faces(__name__, HOMES)
__all__ = sorted(HOMES)
