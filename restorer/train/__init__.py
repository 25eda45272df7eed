"""Training the nets: the maths of a step (``core``, plain PyTorch), synthesised pairs
(``synth``), the zoo's recipes on one process (``recipes``: ``python -m
restorer.train.recipes``, no Ray), and the Ray Train job with its data and checkpoints
(``distributed``, ``data``, ``checkpoints``).

Modules: ``core`` < ``synth`` < ``data``, ``checkpoints`` < ``distributed``; ``recipes``.
"""

from restorer import faces

HOMES = {
    "Trainer": "core",
    "train_step": "core",
    "run_train": "distributed",
    "train_recipe": "recipes",
}
__getattr__ = faces(__name__, HOMES)
__all__ = sorted(HOMES)
