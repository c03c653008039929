"""``pavi://``: checkpoints in SenseTime's pavi model cloud, when the pavi client is installed."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from ckptmap.errors import MissingDependencyError, RemoteNotFoundError, WrongSchemeError
from ckptmap.paths import safe_join
from ckptmap.schemes.local import read_checkpoint_file
from ckptmap.schemes.registry import CheckpointLoader

__all__ = ["load_from_pavi"]

_PREFIX = "pavi://"


@CheckpointLoader.register_scheme(prefixes=_PREFIX)
def load_from_pavi(filename: str, map_location: Any = None) -> Any:
    """Loads ``pavi://MODEL_PATH`` through ``pavi.modelcloud`` into a temporary directory.

    Raises:
        WrongSchemeError: `filename` does not start with ``pavi://`` (a ValueError and, as
            the OpenMMLab `assert` raised, an AssertionError).
        MissingDependencyError: pavi is not installed (an ImportError).
        UnsafePathError: the model cloud names the file with a path, not a plain name.
        RemoteNotFoundError: the model cloud downloaded nothing (a FileNotFoundError).
    """
    if not isinstance(filename, str) or not filename.startswith(_PREFIX):
        raise WrongSchemeError(
            f"load_from_pavi loads pavi:// URIs, not {filename!r}: write pavi://MODEL_PATH, or "
            "load other paths with load_checkpoint / CheckpointLoader.load_checkpoint",
            filename=filename,
            scheme=_PREFIX,
        )
    model_path = filename[len(_PREFIX) :]
    try:
        from pavi import modelcloud  # type: ignore[import-not-found]
    except ImportError as err:
        raise MissingDependencyError(
            f"{filename}: pavi:// checkpoints need the pavi client, which is not installed: "
            "pip install pavi (SenseTime's model cloud client)",
            name="pavi",
        ) from err
    model = modelcloud.get(model_path)
    with tempfile.TemporaryDirectory(prefix="ckptmap-pavi-") as tmp:
        target = safe_join(tmp, str(model.name), what="pavi model name", allow_subdirs=False)
        model.download(str(target))
        if not os.path.exists(target):
            raise RemoteNotFoundError(
                f"{filename}: the pavi model cloud downloaded nothing for {model_path!r} (as "
                f"{str(model.name)!r}); check the model path and your pavi login",
                url=filename,
            )
        return read_checkpoint_file(target, map_location)
