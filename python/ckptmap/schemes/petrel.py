"""``petrel://`` and ``cluster:petrel://``: SenseTime's petrel client, when it is installed.

Without the client these URIs raise a `MissingDependencyError` (an ImportError) that says what
to install; plain ``s3://`` URIs then go through boto3 (`ckptmap.schemes.s3`).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from typing import Any

from ckptmap.errors import MissingDependencyError
from ckptmap.schemes.local import read_checkpoint_file
from ckptmap.schemes.registry import CheckpointLoader

__all__ = ["load_from_petrel", "load_with_petrel", "petrel_available"]


def petrel_available() -> bool:
    """Whether the petrel client (``petrel_client``) can be imported."""
    try:
        return importlib.util.find_spec("petrel_client") is not None
    except (ImportError, ValueError):
        return False


def _client() -> Any:
    try:
        from petrel_client.client import Client  # type: ignore[import-not-found]
    except ImportError as err:
        raise MissingDependencyError(
            "petrel:// (and s3:// with backend='petrel') checkpoints need the petrel client "
            "(petrel_client), which is not installed: install it from your cluster's "
            "documentation, or use s3:// with boto3 and AWS_ENDPOINT_URL for S3-compatible "
            "stores",
            name="petrel_client",
        ) from err
    return Client()


def load_with_petrel(filename: str, map_location: Any = None) -> Any:
    """Reads `filename` with the petrel client and loads it as a checkpoint.

    ``petrel://`` is petrel's alias of ``s3://``; a ``cluster:`` prefix picks the cluster
    configured in petrel's own settings.
    """
    client = _client()
    data = client.get(filename.replace("petrel://", "s3://", 1))
    if data is None:
        raise FileNotFoundError(f"{filename} can not be found by the petrel client")
    with tempfile.TemporaryDirectory(prefix="ckptmap-petrel-") as tmp:
        path = os.path.join(tmp, "checkpoint")
        with open(path, "wb") as handle:
            handle.write(memoryview(data))
        return read_checkpoint_file(path, map_location)


@CheckpointLoader.register_scheme(prefixes=r"(\S+\:)?petrel://")
def load_from_petrel(filename: str, map_location: Any = None) -> Any:
    """Loads ``[cluster:]petrel://bucket/key`` with the petrel client.

    Raises:
        MissingDependencyError: the petrel client is not installed (an ImportError).
    """
    return load_with_petrel(filename, map_location)
