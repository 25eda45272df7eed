"""Importing published PyTorch weights into restorer models, without running their pickles.

``torch.load(weights_only=True)`` unpickles only tensors and plain containers, so a hostile
``.pth`` cannot run code; the tensors must then match the net spec exactly, name for name and
shape for shape. Published DnCNN weights name their layers ``model.0.weight``...; pass
``key_prefix`` and the names are mapped onto ``body.N`` in order when the counts agree.
"""

from __future__ import annotations

from typing import Any

import torch

from restorer.checkpoint import save_model
from restorer.errors import ModelError
from restorer.nets import build_net


def convert_weights(source: str, target: str, spec: dict[str, Any], key_prefix: str = "") -> str:
    """Load ``source`` safely, check it against ``spec``, save a restorer model; returns sha256."""
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a file that is not plain weights is refused
        raise ModelError(f"{source} is not a plain weights file loadable with "
                         f"weights_only=True: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"],
                                                                          dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ModelError(f"{source} does not hold a state dict of tensors")
    state = {k[len(key_prefix):] if key_prefix and k.startswith(key_prefix) else k: v
             for k, v in state.items()}
    net = build_net(spec)
    expected = net.state_dict()
    if set(state) != set(expected):
        # Same tensors in the same order under other names (e.g. model.N vs body.N)?
        ours, theirs = list(expected.items()), list(state.items())
        if len(ours) != len(theirs) or any(a.shape != b.shape for (_, a), (_, b) in
                                           zip(ours, theirs)):
            missing = sorted(set(expected) - set(state))[:5]
            extra = sorted(set(state) - set(expected))[:5]
            raise ModelError(f"{source} does not match net {spec}: missing {missing}, "
                             f"unexpected {extra}; check --net options and --key-prefix")
        state = {name: tensor for (name, _), (_, tensor) in zip(ours, theirs)}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{source} does not match net {spec}: {e}") from None
    return save_model(target, net.eval(), {"converted_from": source, "key_prefix": key_prefix})
