"""Where a checkpoint keeps its weights: under ``"state_dict"``, then ``"model"``, else the
checkpoint is the state dict itself. The one home of that rule, for loading and saving alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ckptmap.errors import NoStateDictError

__all__ = ["STATE_DICT_KEYS", "find_state_dict", "state_dict_key"]

#: Where a checkpoint keeps its state dict, in the order the loaders look.
STATE_DICT_KEYS = ("state_dict", "model")


def state_dict_key(checkpoint: Any) -> str | None:
    """The entry holding the state dict (``"state_dict"``, then ``"model"``), or None when the
    checkpoint is the state dict itself (or not a mapping)."""
    if isinstance(checkpoint, Mapping):
        for key in STATE_DICT_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                return key
    return None


def find_state_dict(checkpoint: Any, source: str = "<checkpoint>") -> Mapping[str, Any]:
    """The weights in a loaded checkpoint: under ``"state_dict"``, then ``"model"``, else all of it.

    Args:
        checkpoint: what `torch.load` returned.
        source: the file name, for messages.

    Raises:
        NoStateDictError: the checkpoint (or its ``"state_dict"`` / ``"model"`` entry) is not a
            mapping.
    """
    if not isinstance(checkpoint, Mapping):
        raise NoStateDictError(source, checkpoint, "top-level object")
    if "state_dict" in checkpoint:
        state_dict = checkpoint["state_dict"]
        if not isinstance(state_dict, Mapping):
            raise NoStateDictError(source, state_dict, "'state_dict' entry")
        return state_dict
    if "model" in checkpoint:
        model = checkpoint["model"]
        if isinstance(model, Mapping):
            return model
        if not isinstance(model, torch.Tensor):
            raise NoStateDictError(source, model, "'model' entry")
        # A tensor named "model": the checkpoint is itself the state dict.
    return checkpoint
