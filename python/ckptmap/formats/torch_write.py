"""``torch.save`` to an open file, keeping the file's own I/O error.

torch's zip writer turns an error of the file's ``write`` into a RuntimeError ("unexpected
pos"); a full disk must stay an OSError (with its errno) so callers can tell it from a bug.
"""

from __future__ import annotations

from typing import IO, Any

import torch

__all__ = ["torch_save"]


class _WriteRecorder:
    """Passes writes through and remembers the first OSError."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._handle.write(data)
        except OSError as err:
            if self.error is None:
                self.error = err
            raise

    def flush(self) -> None:
        self._handle.flush()


def torch_save(obj: Any, handle: IO[bytes]) -> None:
    """``torch.save(obj, handle)``; an OSError of `handle` is raised as itself.

    Raises:
        OSError: writing to `handle` failed (the first such error).
        Whatever `torch.save` raises for `obj` (e.g. an object that can not be pickled).
    """
    recorder = _WriteRecorder(handle)
    try:
        torch.save(obj, recorder)  # type: ignore[arg-type]
    except RuntimeError as err:
        if recorder.error is not None:
            raise recorder.error from err
        raise
