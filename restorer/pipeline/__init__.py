"""The restore job: Ray Data streams inputs through read + decode, a pool of model actors and
encode + write, and the driver commits each unit to the ledger (see :mod:`.driver`).

Modules: ``runtime`` (connecting to Ray, checking nodes) < ``sources`` (inputs -> rows in work
units) < ``stages`` (read + decode, encode + write), ``actor`` (the model) < ``poison``
(isolating an image that kills its worker) < ``graph`` (the Ray Data graph) < ``driver``.
"""

from restorer import faces

HOMES = {
    "restore": "driver",
    "run_restore": "driver",
    "RestoreActor": "actor",
}
__getattr__ = faces(__name__, HOMES)
__all__ = sorted(HOMES)
