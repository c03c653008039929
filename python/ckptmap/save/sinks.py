"""Where saved bytes go: local directories and object stores, one whole file at a time.

A sink is a directory-like place: `Sink.open(name)` gives a writable file whose content becomes
visible under `name` only when the block ends without an error, whole, or not at all.

- `LocalSink`: `ckptmap.atomic.atomic_write` (a temp file beside the target, fsynced,
  ``os.replace``d over it, the directory fsynced). The new file keeps the mode of the file it
  replaces (as ``torch.save``, which writes in place, does); a new file gets the umask's mode.
  A target that is a symlink stays one: the file it points to is replaced. I/O errors come
  out as ckptmap errors that keep their errno and builtin class and name the target.
- `S3Sink` (boto3): a single PUT, or a multipart upload once the data passes one part
  (`S3_PART_SIZE`); S3 makes either visible only when complete, and a failed upload is aborted.
- `PetrelSink`: the petrel client's ``put`` of the whole file (held in memory, as mmengine's
  ``PetrelBackend`` does).

`sink_for` picks the sink for a target and its ``backend_args`` (`ckptmap.objectstore` decides
between boto3 and petrel, for saves as for loads).
"""

from __future__ import annotations

import abc
import contextlib
import errno
import io
import logging
import os
import re
from collections.abc import Iterator, Mapping
from typing import IO, Any

from ckptmap.atomic import atomic_write
from ckptmap.errors import (
    BackendArgsError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    CkptmapError,
    InvalidURIError,
    SaveArgumentTypeError,
    SavePermissionError,
    SaveTargetIsADirectoryError,
    UnsupportedBackendError,
    UnsupportedSaveTargetError,
)
from ckptmap.objectstore import (
    BOTO3,
    BOTO3_CLIENT_ARGS,
    PETREL,
    PETREL_CLIENT_ARGS,
    PETREL_WHERE,
    choose_s3_backend,
    endpoint_text,
    is_object_uri,
    parse_s3_uri,
    petrel_client,
    petrel_get,
    petrel_uri,
    s3_client,
    store_errors,
)

__all__ = [
    "S3_PART_SIZE",
    "LocalSink",
    "PetrelSink",
    "S3Sink",
    "Sink",
    "sink_for",
]

logger = logging.getLogger("ckptmap")

#: Part size of multipart uploads; doubles every 1000 parts (S3 allows 10000).
S3_PART_SIZE = 64 * 2**20

#: Backend names that mean "a local file" (mmengine's and mmcv's).
_LOCAL_BACKENDS = ("local", "disk")

# A URI scheme of two or more characters; one letter is a Windows drive (`C://x`).
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")


class Sink(abc.ABC):
    """A directory-like place files are written to atomically, one name at a time."""

    @abc.abstractmethod
    def open(
        self, name: str, *, text: bool = False, like: str | None = None
    ) -> contextlib.AbstractContextManager[IO[Any]]:
        """A file whose content appears under `name` when the block succeeds.

        Args:
            name: the file's name in this sink.
            text: write str (UTF-8) instead of bytes.
            like: a name whose permissions a new local file takes (its own, if it exists,
                win); ignored by object stores.
        """

    @abc.abstractmethod
    def read_text(self, name: str) -> str | None:
        """The UTF-8 content of `name`, or None when there is no such file."""

    @abc.abstractmethod
    def remove(self, name: str) -> None:
        """Deletes `name` (nothing happens when it does not exist)."""

    @abc.abstractmethod
    def display(self, name: str) -> str:
        """The path or URI of `name`, for messages and return values."""

    def check(self, name: str) -> None:  # noqa: B027 - optional hook, nothing to check by default
        """Raises before anything is serialised when `name` can not be written at all."""


# --- local files --------------------------------------------------------------------------------


def _typed(err: OSError, target: str) -> CkptmapError:
    """A builtin OSError of a save as ckptmap's error of the same builtin family."""
    reason = err.strerror or str(err)
    if isinstance(err, IsADirectoryError):
        return SaveTargetIsADirectoryError(target)
    if isinstance(err, PermissionError):
        return SavePermissionError(
            err.errno,
            f"{reason}: ckptmap writes a temp file beside the target and renames it into "
            f"place, so it needs write access to {os.path.dirname(target) or '.'!r}; fix the "
            "directory's permissions or save somewhere else",
        )
    if isinstance(err, FileNotFoundError):
        return CheckpointNotFoundError(
            target,
            f"can not save {target!r}: {reason} (the directory disappeared while saving?); "
            "check the path and save again",
        )
    return (
        CheckpointSaveError(err.errno, reason)
        if err.errno is not None
        else (CheckpointSaveError(reason))
    )


class LocalSink(Sink):
    """Files in one local directory (created on the first write, as mmengine does)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def display(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def check(self, name: str) -> None:
        target = self.display(name)
        if os.path.isdir(target):
            raise SaveTargetIsADirectoryError(target)
        # The file is replaced, not written in place; a file this process may not write to
        # stays protected, as it is from torch.save.
        if os.path.exists(target) and not os.access(target, os.W_OK):
            raise SavePermissionError(
                errno.EACCES,
                f"{os.strerror(errno.EACCES)}: {target!r} is write-protected; change its mode "
                "(chmod u+w) or save under another name",
            )

    def open(
        self, name: str, *, text: bool = False, like: str | None = None
    ) -> contextlib.AbstractContextManager[IO[Any]]:
        return self._write(name, text, like)

    @contextlib.contextmanager
    def _write(self, name: str, text: bool, like: str | None) -> Iterator[IO[Any]]:
        target = self.display(name)
        try:
            os.makedirs(self.directory or ".", exist_ok=True)
            with atomic_write(
                target,
                "w" if text else "wb",
                follow_symlinks=True,
                keep_permissions=True,
                permissions_from=None if like is None else self.display(like),
            ) as handle:
                yield handle
        except CkptmapError:
            raise
        except OSError as err:
            if type(err).__module__ != "builtins":
                raise
            raise _typed(err, target) from err

    def read_text(self, name: str) -> str | None:
        try:
            with open(self.display(name), encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.display(name))


# --- boto3 --------------------------------------------------------------------------------------


class S3Sink(Sink):
    """Objects under one S3 prefix, through boto3; each is made visible whole or not at all."""

    def __init__(self, client: Any, bucket: str, prefix: str, where: str) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.where = where

    @classmethod
    def for_uri(cls, uri: str, args: Mapping[str, Any]) -> tuple[S3Sink, str]:
        """The sink of `uri`'s directory and the object's name in it.

        Args:
            uri: ``[cluster:]s3://bucket/key`` (a cluster is petrel's; boto3 ignores it).
            args: ``boto3.client`` arguments (`ckptmap.objectstore.BOTO3_CLIENT_ARGS`).
        """
        cluster, bucket, key = parse_s3_uri(uri)
        if key.endswith("/"):
            raise InvalidURIError(
                f"{uri!r} names a directory, not an object: write s3://bucket/path/name.pth",
                uri=uri,
            )
        _check_args(BOTO3, args, BOTO3_CLIENT_ARGS)
        if cluster:
            logger.warning(
                "Ignoring the cluster prefix %r of %s: it is a petrel setting, and boto3 uses %s",
                cluster,
                uri,
                endpoint_text(args.get("endpoint_url")),
            )
        client = s3_client(**args)
        prefix, _, name = key.rpartition("/")
        where = endpoint_text(args.get("endpoint_url"))
        return cls(client, bucket, prefix + "/" if prefix else "", where), name

    def display(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{name}"

    def errors(self, name: str) -> contextlib.AbstractContextManager[None]:
        """botocore's errors raised as ckptmap's, naming the URI and the endpoint."""
        return store_errors(self.display(name), writing=True, where=self.where)

    def open(
        self, name: str, *, text: bool = False, like: str | None = None
    ) -> contextlib.AbstractContextManager[IO[Any]]:
        return self._upload(name, text)

    @contextlib.contextmanager
    def _upload(self, name: str, text: bool) -> Iterator[IO[Any]]:
        writer = _S3Writer(self, name)
        try:
            yield _TextWriter(writer) if text else writer  # type: ignore[misc]
            writer.commit()
        except BaseException:
            writer.abort()
            raise

    def read_text(self, name: str) -> str | None:
        try:
            with self.errors(name):
                body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"]
                return body.read().decode("utf-8")
        except FileNotFoundError:
            return None

    def remove(self, name: str) -> None:
        with self.errors(name):
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)


class _S3Writer:
    """A write-only file that uploads as it goes: one PUT when small, else a multipart upload.

    Nothing is visible at the key until `commit`; `abort` drops an unfinished upload.
    """

    def __init__(self, sink: S3Sink, name: str) -> None:
        self._sink = sink
        self._name = name
        self._key = sink.prefix + name
        self._buffer = bytearray()
        self._parts: list[dict[str, Any]] = []
        self._upload_id: str | None = None

    def _part_size(self) -> int:
        return S3_PART_SIZE << (len(self._parts) // 1000)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        start = 0
        while start < len(view):
            take = min(len(view) - start, self._part_size() - len(self._buffer))
            self._buffer += view[start : start + take]
            start += take
            if len(self._buffer) >= self._part_size():
                self._upload_part()
        return len(view)

    def flush(self) -> None:
        pass

    def _upload_part(self) -> None:
        client, bucket = self._sink.client, self._sink.bucket
        with self._sink.errors(self._name):
            if self._upload_id is None:
                created = client.create_multipart_upload(Bucket=bucket, Key=self._key)
                self._upload_id = created["UploadId"]
            body, self._buffer = self._buffer, bytearray()
            number = len(self._parts) + 1
            answer = client.upload_part(
                Bucket=bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=bytes(body),
            )
            self._parts.append({"ETag": answer["ETag"], "PartNumber": number})

    def commit(self) -> None:
        client, bucket = self._sink.client, self._sink.bucket
        if self._upload_id is None:
            with self._sink.errors(self._name):
                client.put_object(Bucket=bucket, Key=self._key, Body=bytes(self._buffer))
            self._buffer = bytearray()
            return
        if self._buffer:
            self._upload_part()
        with self._sink.errors(self._name):
            client.complete_multipart_upload(
                Bucket=bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
        self._upload_id = None

    def abort(self) -> None:
        self._buffer = bytearray()
        if self._upload_id is not None:
            with contextlib.suppress(Exception):
                self._sink.client.abort_multipart_upload(
                    Bucket=self._sink.bucket, Key=self._key, UploadId=self._upload_id
                )
            self._upload_id = None


class _TextWriter:
    """Text in, UTF-8 out, for the index file."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def write(self, text: str) -> int:
        self._raw.write(text.encode("utf-8"))
        return len(text)


# --- petrel -------------------------------------------------------------------------------------


class PetrelSink(Sink):
    """Objects next to one ``[cluster:]s3://`` or ``petrel://`` URI, through the petrel client."""

    def __init__(self, client: Any, base: str, path_mapping: Mapping[str, str] | None) -> None:
        self.client = client
        self.base = base
        self.path_mapping = path_mapping

    @classmethod
    def for_uri(cls, uri: str, args: Mapping[str, Any]) -> tuple[PetrelSink, str]:
        """The sink of `uri`'s directory and the object's name in it.

        Args:
            uri: ``[cluster:]s3://bucket/key`` or ``[cluster:]petrel://bucket/key``.
            args: mmengine's ``PetrelBackend`` arguments (``path_mapping``, ``enable_mc``,
                ``conf_path``).
        """
        _check_args(PETREL, args, PETREL_CLIENT_ARGS)
        _, _, key = parse_s3_uri(petrel_uri(uri))
        if key.endswith("/"):
            raise InvalidURIError(
                f"{uri!r} names a directory, not an object: write s3://bucket/path/name.pth",
                uri=uri,
            )
        client = petrel_client(conf_path=args.get("conf_path"), enable_mc=args.get("enable_mc"))
        base, _, name = uri.rpartition("/")
        return cls(client, base + "/", args.get("path_mapping")), name

    def display(self, name: str) -> str:
        return self.base + name

    def _uri(self, name: str) -> str:
        return petrel_uri(self.display(name), self.path_mapping)

    def errors(self, name: str) -> contextlib.AbstractContextManager[None]:
        """The petrel client's errors raised as ckptmap's, naming the URI."""
        return store_errors(self.display(name), writing=True, where=PETREL_WHERE)

    def open(
        self, name: str, *, text: bool = False, like: str | None = None
    ) -> contextlib.AbstractContextManager[IO[Any]]:
        return self._put(name, text)

    @contextlib.contextmanager
    def _put(self, name: str, text: bool) -> Iterator[IO[Any]]:
        buffer = io.BytesIO()
        yield _TextWriter(buffer) if text else buffer  # type: ignore[misc]
        with self.errors(name):
            self.client.put(self._uri(name), buffer.getbuffer())

    def read_text(self, name: str) -> str | None:
        try:
            with self.errors(name):
                data = petrel_get(self.client, self._uri(name))
        except FileNotFoundError:
            return None
        return None if data is None else bytes(data).decode("utf-8")

    def remove(self, name: str) -> None:
        with self.errors(name):
            self.client.delete(self._uri(name))


# --- choosing -----------------------------------------------------------------------------------


def _check_args(backend: str, args: Mapping[str, Any], accepted: frozenset[str]) -> None:
    unknown = sorted(set(args) - accepted)
    if not unknown:
        return
    others = {BOTO3: PETREL_CLIENT_ARGS, PETREL: BOTO3_CLIENT_ARGS}.get(backend, frozenset())
    hint = ""
    if others and set(unknown) <= others:
        other = PETREL if backend == BOTO3 else BOTO3
        hint = f"; they are {other}'s: pass 'backend': {other!r} to use it"
    raise BackendArgsError(
        f"backend_args for the {backend} backend take {sorted(accepted) or 'nothing'} (and "
        f"'backend'); unknown: {unknown}{hint}",
        backend=backend,
        unknown=unknown,
        accepted=sorted(accepted),
    )


def sink_for(filename: Any, backend_args: Mapping[str, Any] | None) -> tuple[Sink, str]:
    """The sink that writes `filename`, and the file's name in it.

    Args:
        filename: a local path, ``[cluster:]s3://bucket/key`` or ``petrel://bucket/key``.
        backend_args: ``backend_args`` / ``file_client_args``: ``backend`` (``"local"`` /
            ``"disk"`` for local paths, ``"boto3"`` / ``"petrel"`` for object stores) and
            that backend's own arguments.

    Raises:
        SaveArgumentTypeError: `filename` or `backend_args` of the wrong type.
        SaveTargetIsADirectoryError: a local path ending in a separator.
        UnsupportedSaveTargetError: a scheme ckptmap does not write (``pavi://``, ``http://``).
        UnsupportedBackendError: a backend that can not write `filename`.
        BackendArgsError: arguments the chosen backend does not take.
        InvalidURIError: an object-store URI without a bucket or object name.
        MissingDependencyError: boto3 or the petrel client is not installed.
    """
    if backend_args is not None and not isinstance(backend_args, Mapping):
        raise SaveArgumentTypeError(
            f"backend_args must be a dict or None, not {type(backend_args).__name__}"
        )
    try:
        target = os.fspath(filename)
    except TypeError:
        raise SaveArgumentTypeError(
            f"filename must be a str or os.PathLike[str], not {type(filename).__name__}"
        ) from None
    if not isinstance(target, str):
        raise SaveArgumentTypeError(
            f"filename must be a str or os.PathLike[str], not {type(filename).__name__}"
        )
    args = dict(backend_args or {})
    backend = args.pop("backend", None)
    if is_object_uri(target):
        if choose_s3_backend(target, backend) == PETREL:
            return PetrelSink.for_uri(target, args)
        return S3Sink.for_uri(target, args)
    scheme = _SCHEME.match(target)
    if scheme is not None:
        raise UnsupportedSaveTargetError(
            f"can not save to {target!r}: ckptmap writes local paths, s3:// and petrel:// "
            f"URIs, not {scheme.group(1)}://; save locally and upload it yourself"
        )
    if backend is not None and backend not in _LOCAL_BACKENDS:
        raise UnsupportedBackendError(
            f"backend {backend!r} can not write the local path {target!r}: local paths take "
            "'local' (or 'disk'), or no backend; object stores need an s3:// or petrel:// URI",
            backend=backend,
            target=target,
            supported=list(_LOCAL_BACKENDS),
        )
    _check_args(str(backend or "local"), args, frozenset())
    path = os.path.expanduser(target)
    directory, name = os.path.split(path)
    if not name:
        raise SaveTargetIsADirectoryError(target)
    return LocalSink(directory), name
