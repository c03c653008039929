"""``petrel://`` (and ``s3://`` when petrel serves it): SenseTime's petrel client.

Which client serves ``s3://`` is `ckptmap.objectstore`'s rule (the same for saves). Without the
client, petrel URIs raise a `MissingDependencyError` (an ImportError) that says what to
install.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from ckptmap.errors import RemoteNotFoundError
from ckptmap.objectstore import PETREL_WHERE, petrel_client, petrel_get, petrel_uri, store_errors
from ckptmap.schemes.local import read_checkpoint_file
from ckptmap.schemes.registry import CheckpointLoader

__all__ = ["load_from_petrel", "load_with_petrel"]


def load_with_petrel(filename: str, map_location: Any = None) -> Any:
    """Reads `filename` with the petrel client and loads it as a checkpoint.

    ``petrel://`` is petrel's alias of ``s3://``; a ``cluster:`` prefix picks the cluster
    configured in petrel's own settings. The bytes go to a temporary file that is loaded like
    any local checkpoint (format sniffed, pickles loaded safely) and then removed.

    Raises:
        MissingDependencyError: the petrel client is not installed (an ImportError).
        RemoteNotFoundError: no such object (a FileNotFoundError).
        RemoteAccessDenied, RemoteUnavailableError, DownloadError: the client's other errors.
    """
    client = petrel_client()
    with store_errors(filename, writing=False, where=PETREL_WHERE):
        data = petrel_get(client, petrel_uri(filename))
    if data is None:
        raise RemoteNotFoundError(
            f"{filename} does not exist: the petrel client found no such object; check the "
            "bucket, the key and the cluster in ~/petreloss.conf",
            url=filename,
        )
    with tempfile.TemporaryDirectory(prefix="ckptmap-petrel-") as tmp:
        path = os.path.join(tmp, "checkpoint")
        with open(path, "wb") as handle:
            handle.write(memoryview(data))
        return read_checkpoint_file(path, map_location)


@CheckpointLoader.register_scheme(prefixes=r"(\S+\:)?petrel://")
def load_from_petrel(filename: str, map_location: Any = None) -> Any:
    """Loads ``[cluster:]petrel://bucket/key`` with the petrel client.

    Raises:
        See `load_with_petrel`.
    """
    return load_with_petrel(filename, map_location)
