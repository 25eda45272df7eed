"""What a job leaves a person to read: the report page of a restore job (``page``, from the
ledger and digests: :mod:`.stats` for the outliers, :mod:`.crops` for the pixels, :mod:`.charts`
and :mod:`.render` for the page), the report of a training run, the end-of-job summary
(``summary``) and ``restorer inspect`` (``inspection``).

Modules: ``stats``, ``crops``, ``charts`` < ``render`` < ``page``; ``summary``; ``inspection``.
"""

from restorer import faces

HOMES = {
    "write_report": "page",
    "write_train_report": "page",
    "flag_outliers": "stats",
    "scan_outliers": "stats",
    "report_uri": "stats",
    "MIN_RECORDS": "stats",
    "MIN_SPREAD": "stats",
    "OUTLIER_K": "stats",
    "JobState": "summary",
    "summarize": "summary",
    "inspect_output": "inspection",
}
__getattr__ = faces(__name__, HOMES)
__all__ = sorted(HOMES)
