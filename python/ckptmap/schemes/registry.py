"""`CheckpointLoader`: which function turns a path or URI into a checkpoint.

Prefixes are regular expressions matched at the start of the path (`re.match`), as in
OpenMMLab, so ``(\\S+\\:)?s3://`` catches both ``s3://b/k`` and ``cluster:s3://b/k``. Longer
prefixes are tried first. The empty prefix is the local-file fallback, but only for things
that look like paths: ``foo://x`` with no loader for ``foo://`` is an error that lists the
registered schemes, while Windows paths such as ``C:\\x.pth`` or ``D:/x.pth`` stay local.

URI schemes are case-insensitive (RFC 3986): ``HTTPS://host/x`` and ``S3://b/k`` reach the
loaders of ``https://`` and ``s3://``, with the scheme written in lower case. ``file://`` URIs
are local files.

Precedence between a local path and a prefix: a string that starts with a URI scheme
(``s3://...``, ``https://...``) or with petrel's ``cluster:scheme://`` form always goes to that
scheme's loader. Anything else that matches a prefix somewhere but exists on the local
filesystem (``runs/a:s3://b/ckpt.pth``) is the local file.

The built-in loaders (local, http(s), model zoos, s3, petrel, pavi) register themselves when
`ckptmap.schemes` is imported.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, TypeVar

from ckptmap.errors import (
    SchemeAlreadyRegisteredError,
    SchemeRegistrationError,
    UnknownSchemeError,
)
from ckptmap.formats import allowlist
from ckptmap.redact import redact_url
from ckptmap.report import log_message

__all__ = ["CheckpointLoader", "LoaderFunc"]

LoaderFunc = Callable[..., Any]
_F = TypeVar("_F", bound=LoaderFunc)

# A URI scheme of two or more characters followed by `://`; one letter is a drive (`C://x`).
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")
# The same, optionally after petrel's `cluster:` prefix (no `/` in the cluster name).
_SCHEME = re.compile(r"^(?P<cluster>[^/\\\s:]+:)?(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]+)://")


def _compile(prefix: str) -> re.Pattern[str]:
    try:
        return re.compile(prefix)
    except re.error:
        return re.compile(re.escape(prefix))


class CheckpointLoader:
    """A registry of checkpoint loaders, keyed by path prefix.

    A loader is called as ``loader(filename, map_location)`` and returns the checkpoint.
    """

    _schemes: ClassVar[dict[str, LoaderFunc]] = OrderedDict()
    _patterns: ClassVar[dict[str, re.Pattern[str]]] = {}

    @classmethod
    def _register_scheme(
        cls, prefixes: str | Sequence[str], loader: LoaderFunc, force: bool = False
    ) -> None:
        if isinstance(prefixes, str):
            prefixes = [prefixes]
        elif not isinstance(prefixes, (list, tuple)):
            raise SchemeRegistrationError(
                f"prefixes must be a str or a list/tuple of str, got {type(prefixes).__name__}"
            )
        if not callable(loader):
            raise SchemeRegistrationError(f"a checkpoint loader must be callable, got {loader!r}")
        for prefix in prefixes:
            if not isinstance(prefix, str):
                raise SchemeRegistrationError(f"a scheme prefix must be a str, got {prefix!r}")
            if prefix in cls._schemes and not force:
                raise SchemeAlreadyRegisteredError(
                    f"{prefix} is already registered as a loader backend, "
                    'add "force=True" if you want to override it',
                    prefix=prefix,
                )
        schemes = dict(cls._schemes)
        for prefix in prefixes:
            schemes[prefix] = loader
            cls._patterns[prefix] = _compile(prefix)
        # Longer prefixes take priority; equal lengths in a fixed order.
        cls._schemes = OrderedDict(
            sorted(schemes.items(), key=lambda item: (len(item[0]), item[0]), reverse=True)
        )

    @classmethod
    def register_scheme(
        cls,
        prefixes: str | Sequence[str],
        loader: LoaderFunc | None = None,
        force: bool = False,
    ) -> Any:
        """Registers a loader for one or more prefixes; usable as a call or a decorator.

        Args:
            prefixes: a prefix or a list/tuple of them (regular expressions matched at the
                start of the path; plain strings such as ``"myzoo://"`` work as they are).
            loader: the loader; leave it out to use this method as a decorator.
            force: replace a loader already registered for a prefix.

        Returns:
            None when `loader` is given, else a decorator that registers and returns the
            function it decorates.

        Raises:
            KeyError: a prefix is already registered and `force` is False (nothing is
                registered then).
        """
        if loader is not None:
            cls._register_scheme(prefixes, loader, force=force)
            return None

        def _register(loader_func: _F) -> _F:
            cls._register_scheme(prefixes, loader_func, force=force)
            return loader_func

        return _register

    @classmethod
    def registered_schemes(cls) -> list[str]:
        """The registered prefixes, in matching order."""
        return list(cls._schemes)

    @classmethod
    def _get_checkpoint_loader(cls, path: str) -> LoaderFunc:
        """The loader for `path`.

        Raises:
            UnknownSchemeError: `path` is a URI whose scheme no loader handles, or no prefix
                matches and there is no local loader.
        """
        return cls._resolve(path)[0]

    @classmethod
    def _resolve(cls, path: str) -> tuple[LoaderFunc, str]:
        """The loader for `path`, and the path to hand it (its URI scheme in lower case)."""
        uri = _SCHEME.match(path)
        normal = path
        if uri is not None:
            start, end = uri.span("scheme")
            normal = path[:start] + path[start:end].lower() + path[end:]
        elif "" in cls._schemes and os.path.lexists(path):
            # Not a URI but it exists here: a local path, whatever prefix it also matches.
            return cls._schemes[""], path
        for candidate in dict.fromkeys((path, normal)):
            for prefix, loader in cls._schemes.items():
                if prefix and cls._patterns[prefix].match(candidate) is not None:
                    return loader, candidate
        if "" in cls._schemes and _URI.match(path) is None:
            return cls._schemes[""], path
        scheme = path.split("://", 1)[0] + "://" if "://" in path else path
        shown = ", ".join(repr(p) for p in cls._schemes if p) or "none"
        raise UnknownSchemeError(
            f"no checkpoint loader is registered for {redact_url(scheme)!r} (in "
            f"{redact_url(path)!r}). Registered schemes: {shown}, and local paths. Check the "
            "spelling, or register one with CheckpointLoader.register_scheme",
            filename=path,
            schemes=list(cls._schemes),
        )

    @classmethod
    def load_checkpoint(
        cls,
        filename: str | os.PathLike[str],
        map_location: Any = None,
        logger: Any = None,
        *,
        allowed_globals: Iterable[Any] = (),
    ) -> Any:
        """Loads a checkpoint from a local path or any registered URI.

        Args:
            filename: a local path, an ``http(s)://`` URL, or a ``torchvision://``,
                ``open-mmlab://``, ``s3://``, ... URI.
            map_location: as for `torch.load`.
            logger: where the "Loads checkpoint by ..." line goes: a `logging.Logger`, a
                logger name, None or ``"current"`` for the ``ckptmap`` logger, ``"silent"``.
            allowed_globals: objects a pickle checkpoint may use besides the default allowlist
                (`ckptmap.formats.allowlist`); reaches the file through every scheme.

        Returns:
            The checkpoint, usually a dict.

        Raises:
            UnsafeAllowlistError: an `allowed_globals` entry that can run code (nothing is
                fetched then).
        """

        path = filename if isinstance(filename, str) else os.fspath(filename)
        with allowlist.extended(allowed_globals):
            return cls._load(path, map_location, logger)

    @classmethod
    def _load(cls, path: str, map_location: Any, logger: Any) -> Any:
        loader, path = cls._resolve(path)
        cls.log_backend(path, loader, logger)
        return loader(path, map_location)

    @staticmethod
    def log_backend(path: str, loader: LoaderFunc, logger: Any = None) -> None:
        """Logs the "Loads checkpoint by BACKEND backend from path: PATH" line (rank 0)."""
        name = getattr(loader, "__name__", type(loader).__name__)
        backend = name[len("load_from_") :] if name.startswith("load_from_") else name
        log_message(
            f"Loads checkpoint by {backend} backend from path: {redact_url(path)}",
            logger=logger,
            level=logging.INFO,
        )
