"""Model files: safetensors weights beside the spec that built them, the bundled zoo
(``restorer/zoo/``: files and cards), and importers of weights others publish (pickled
checkpoints read without running them).

Modules: ``checkpoint`` (save / load a model file) < ``zoo`` (the bundled models, their cards);
``unpickle`` (a safe reader of torch pickles) < ``convert`` (a foreign file -> a model file).
"""

from restorer import faces

HOMES = {
    "save_model": "checkpoint",
    "load_model": "checkpoint",
    "LoadedModel": "checkpoint",
    "get_model": "zoo",
    "resolve_model_uri": "zoo",
    "DEFAULT_MODEL": "zoo",
    "convert_weights": "convert",
    "read_torch_file": "unpickle",
}
__getattr__ = faces(__name__, HOMES)
__all__ = sorted(HOMES)
