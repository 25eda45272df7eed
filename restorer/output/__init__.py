"""What a restore job records beside its results, under ``OUTPUT/_restorer/``: the records'
schemas, the ledger of committed units (every read and write of ``_restorer/``), the lease of
the running job and the digests of its runs.

Modules: ``records`` (rows and schemas) < ``ledger`` < ``lease``, ``digest``.
"""

from restorer import faces

HOMES = {
    "RECORD_SCHEMA": "records",
    "ERROR_COLUMNS": "records",
    "commit_unit": "ledger",
    "ledger_records": "ledger",
    "meta_uri": "ledger",
    "Lease": "lease",
    "Digest": "digest",
    "job_digest": "digest",
}
__getattr__ = faces(__name__, HOMES)
__all__ = sorted(HOMES)
