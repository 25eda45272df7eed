"""restorer: distributed batch image restoration with CNNs on Ray.

Ray reads ``RAY_AUTH_MODE`` once, when it is first imported, and the clusters this package
starts must agree with the driver; so the mode is set here, before any submodule imports Ray.
Token authentication (Ray's default for local clusters since 2.59) stays on unless the caller
set the variable already, or imported Ray before restorer.
"""

import importlib
import os
import sys

# If Ray was imported first, it has already read the variable: changing it now would make the
# clusters Ray starts disagree with this driver, so leave it as it is.
if "ray" not in sys.modules:
    os.environ.setdefault("RAY_AUTH_MODE", "token")

__version__ = "0.1.0"

# The package is grouped in wings, each importing only the wings below it (README, "Layout";
# tests/test_layers.py keeps the order): errors < image < io, nets < weights < job < output <
# report < pipeline < quality < train < launch < cli. Each wing's ``__init__`` names its public
# faces, imported from their modules on first use (:func:`faces`), so that the Ray-free wings
# (nets, image, weights, train's core) import where Ray is not installed (a bare GPU box that
# runs ``python -m restorer.train.recipes``).
#
# The public API: ``restorer.restore("photos/", "restored/", model="denoise-gray")``, and
# ``restore``, ``run_restore`` and ``RestoreActor`` from :mod:`restorer.pipeline`.


def faces(package: str, homes: dict[str, str]):
    """A wing's module ``__getattr__`` (PEP 562): ``homes`` maps each public name to the module
    of ``package`` that defines it, imported when the name is first asked for."""

    def __getattr__(name: str):
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{homes[name]}"), name)

    return __getattr__


__getattr__ = faces(__name__, {"restore": "pipeline"})
__all__ = ["__version__", "faces", "restore"]
