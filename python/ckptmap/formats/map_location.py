"""`map_location` for `torch.load`, checked: a callable that raises or returns something that is
not a storage becomes a `MapLocationError` naming the file, instead of an error from deep
inside torch's unpickler."""

from __future__ import annotations

from typing import Any

import torch

from ckptmap.errors import MapLocationError

__all__ = ["checked_map_location"]


def checked_map_location(map_location: Any, path: str) -> Any:
    """`map_location` as `torch.load` takes it, with a callable wrapped in checks.

    Args:
        map_location: None, a device or device string, a dict of location tags, or a
            callable ``(storage, location) -> storage | None``.
        path: the checkpoint, for messages.

    Returns:
        `map_location` unchanged, or a wrapper of the callable.

    Raises:
        MapLocationError: `map_location` is of none of those kinds (the wrapper raises it when
            the callable raises, or returns something other than a storage or None).
    """
    if map_location is None or isinstance(map_location, (str, bytes, dict, torch.device)):
        return map_location
    if not callable(map_location):
        raise MapLocationError(
            path,
            f"is a {type(map_location).__name__}, not None, a device, a str, a dict or a callable,",
        )
    fn = map_location

    def call(storage: Any, location: str) -> Any:
        try:
            moved = fn(storage, location)
        except Exception as err:
            raise MapLocationError(path, f"raised {type(err).__name__}: {err}") from err
        if moved is not None and not isinstance(moved, (torch.UntypedStorage, torch.TypedStorage)):
            raise MapLocationError(
                path, f"returned an object of type {type(moved).__name__}, not a storage or None"
            )
        return moved

    return call
