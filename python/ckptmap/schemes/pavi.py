"""``pavi://``: checkpoints in SenseTime's pavi model cloud, when the pavi client is installed."""

from __future__ import annotations

import tempfile
from typing import Any

from ckptmap.errors import MissingDependencyError
from ckptmap.paths import safe_join
from ckptmap.schemes.local import read_checkpoint_file
from ckptmap.schemes.registry import CheckpointLoader

__all__ = ["load_from_pavi"]


@CheckpointLoader.register_scheme(prefixes="pavi://")
def load_from_pavi(filename: str, map_location: Any = None) -> Any:
    """Loads ``pavi://MODEL_PATH`` through ``pavi.modelcloud`` into a temporary directory.

    Raises:
        ValueError: `filename` does not start with ``pavi://``.
        MissingDependencyError: pavi is not installed (an ImportError).
        UnsafePathError: the model cloud names the file with a path, not a plain name.
    """
    if not filename.startswith("pavi://"):
        raise ValueError(f"Expected filename startswith `pavi://`, but get {filename}")
    model_path = filename[len("pavi://") :]
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
        return read_checkpoint_file(target, map_location)
