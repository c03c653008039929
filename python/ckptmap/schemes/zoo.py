"""Model-zoo names: ``torchvision://``, ``modelzoo://``, ``open-mmlab://``, ``openmmlab://``,
``mmcls://``, ``mmdet://``, ``mmseg://`` and ``bdd100k://``.

The name tables are data. For each kind, later sources override earlier ones:

1. mmcv's ``model_zoo/*.json`` and mmengine's ``hub/*.json`` package data, when installed
   (found without importing either package);
2. for torchvision, the weight enums of the installed torchvision (``resnet50.imagenet1k_v1``,
   ``resnet50.default``; ``ResNet50_Weights.IMAGENET1K_V1`` is accepted too);
3. the user's own file in the cache home: ``open_mmlab.json``, ``mmcls.json``,
   ``deprecated.json``, ``torchvision.json``.

A table value is a URL, or a path relative to the cache home (never outside it). ``mmdet://``,
``mmseg://`` and ``bdd100k://`` append the name to a fixed URL, as vis4d does.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ckptmap.cache import cache_home
from ckptmap.errors import (
    CheckpointNotFoundError,
    MissingDependencyError,
    UnknownModelNameError,
    ZooTableError,
)
from ckptmap.paths import check_relative_name, open_regular, safe_join
from ckptmap.schemes.local import read_checkpoint_file
from ckptmap.schemes.registry import CheckpointLoader
from ckptmap.schemes.web import load_from_http
from ckptmap.statedict import find_state_dict

__all__ = [
    "BDD100K_MODEL_PREFIX",
    "MM_MODEL_MAP",
    "get_deprecated_model_names",
    "get_external_models",
    "get_mmcls_models",
    "get_torchvision_models",
    "load_from_bdd100k",
    "load_from_mmcls",
    "load_from_mmdet",
    "load_from_mmseg",
    "load_from_openmmlab",
    "load_from_torchvision",
    "resolve_zoo_url",
    "torchvision_weight_urls",
]

#: vis4d's URL maps: the name after the scheme is appended to these.
BDD100K_MODEL_PREFIX = "https://dl.cv.ethz.ch/bdd100k/"
MM_MODEL_MAP = {
    "mmdet://": "https://download.openmmlab.com/mmdetection/v2.0/",
    "mmseg://": "https://download.openmmlab.com/mmsegmentation/v0.5/",
}

# kind -> ((package, file inside it), ...) in increasing priority, and the user's file name.
_PACKAGE_TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "openmmlab": (("mmcv", "model_zoo/open_mmlab.json"), ("mmengine", "hub/openmmlab.json")),
    "mmcls": (("mmcv", "model_zoo/mmcls.json"), ("mmengine", "hub/mmcls.json")),
    "deprecated": (("mmcv", "model_zoo/deprecated.json"), ("mmengine", "hub/deprecated.json")),
    "torchvision": (
        ("mmcv", "model_zoo/torchvision_0.12.json"),
        ("mmengine", "hub/torchvision_0.12.json"),
    ),
}
_USER_TABLES = {
    "openmmlab": "open_mmlab.json",
    "mmcls": "mmcls.json",
    "deprecated": "deprecated.json",
    "torchvision": "torchvision.json",
}


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _read_table(path: Path) -> dict[str, str]:
    try:
        with open_regular(path, what="model-zoo table") as handle:
            data = json.loads(handle.read())
    except RecursionError:
        raise ZooTableError(
            f"model-zoo table {path} is JSON nested too deeply to read: fix or remove it",
            path=str(path),
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ZooTableError(
            f"model-zoo table {path} is not valid JSON ({err}): fix or remove it", path=str(path)
        ) from err
    if not isinstance(data, dict):
        raise ZooTableError(
            f"model-zoo table {path} must be a JSON object mapping names to URLs, not a "
            f"{type(data).__name__}: fix or remove it",
            path=str(path),
        )
    table: dict[str, str] = {}
    for name, value in data.items():
        if value is None:  # torchvision_0.12.json lists models that have no weights
            continue
        if not isinstance(value, str):
            raise ZooTableError(
                f"model-zoo table {path}: the entry {name!r} must be a string (a URL or a path "
                f"relative to {cache_home()}), not {value!r}: fix or remove it",
                path=str(path),
            )
        table[name] = value
    return table


def _table(
    kind: str, extra: Callable[[], dict[str, str]] | None = None
) -> tuple[dict[str, str], list[str]]:
    """The merged table of `kind` and the sources it came from."""
    table: dict[str, str] = {}
    sources: list[str] = []
    for package, relative in _PACKAGE_TABLES[kind]:
        root = _package_dir(package)
        if root is not None and (root / relative).is_file():
            table.update(_read_table(root / relative))
            sources.append(str(root / relative))
    if extra is not None:
        table.update(extra())
        sources.append("torchvision's weight enums")
    user = cache_home() / _USER_TABLES[kind]
    if user.is_file():
        table.update(_read_table(user))
        sources.append(str(user))
    else:
        sources.append(f"{user} (absent)")
    return table, sources


def _unknown(
    scheme: str, name: str, table: dict[str, str], sources: list[str], hint: str = ""
) -> UnknownModelNameError:
    suggestions = difflib.get_close_matches(name, list(table), n=5, cutoff=0.6)
    did_you_mean = (
        f" Did you mean: {', '.join(scheme + s for s in suggestions)}?" if suggestions else ""
    )
    return UnknownModelNameError(
        f"{scheme}{name} is not a known model name.{did_you_mean} Looked in: "
        f"{'; '.join(sources)}.{hint}",
        name=name,
        suggestions=suggestions,
        sources=sources,
    )


def torchvision_weight_urls(models: Any) -> dict[str, str]:
    """``{"resnet50.imagenet1k_v1": url, "resnet50.default": url, ...}`` from weight enums.

    Args:
        models: the `torchvision.models` module (or anything with the same weight API:
            `list_models` and `get_model_weights`, or ``*_Weights`` enum classes).
    """
    if hasattr(models, "list_models") and hasattr(models, "get_model_weights"):
        weight_classes = [models.get_model_weights(name) for name in models.list_models(models)]
    else:
        weight_classes = [value for key, value in vars(models).items() if key.endswith("_Weights")]
    urls: dict[str, str] = {}
    for cls in weight_classes:
        # Some weight classes are empty (no DEFAULT); they have no URLs to offer.
        if not hasattr(cls, "DEFAULT"):
            continue
        key = cls.__name__.replace("_Weights", "").lower()
        urls[f"{key}.default"] = cls.DEFAULT.url
        for weight in cls:
            urls[f"{key}.{weight.name.lower()}"] = weight.url
    return urls


def _torchvision_installed() -> bool:
    try:
        return importlib.util.find_spec("torchvision") is not None
    except (ImportError, ValueError):
        return False


def _torchvision_enums() -> dict[str, str]:
    import torchvision.models  # type: ignore[import-not-found]

    return torchvision_weight_urls(torchvision.models)


def get_torchvision_models() -> dict[str, str]:
    """Every ``torchvision://`` name and its URL (see the module docstring for the sources)."""
    extra = _torchvision_enums if _torchvision_installed() else None
    return _table("torchvision", extra)[0]


def get_external_models() -> dict[str, str]:
    """Every ``open-mmlab://`` name and its URL or cache-relative path."""
    return _table("openmmlab")[0]


def get_mmcls_models() -> dict[str, str]:
    """Every ``mmcls://`` name and its URL."""
    return _table("mmcls")[0]


def get_deprecated_model_names() -> dict[str, str]:
    """Deprecated ``open-mmlab://`` names and the names that replace them."""
    return _table("deprecated")[0]


def _load_entry(value: str, map_location: Any, what: str) -> Any:
    """Loads a table value: a URL through the cache, else a file inside the cache home."""
    if value.startswith(("http://", "https://")):
        return load_from_http(value, map_location=map_location)
    path = safe_join(cache_home(), value, what=f"{what} table entry")
    if not path.is_file():
        raise CheckpointNotFoundError(
            str(path),
            f"{what} points to {value!r}, but {path} can not be found: put the checkpoint "
            "there or fix the entry in the name table",
        )
    return read_checkpoint_file(path, map_location)


def resolve_zoo_url(filename: str) -> str:
    """The URL of an ``mmdet://``, ``mmseg://`` or ``bdd100k://`` name.

    Raises:
        UnsafePathError: the name is not a plain relative path.
        ValueError: not one of these schemes.
    """
    for scheme, prefix in (*MM_MODEL_MAP.items(), ("bdd100k://", BDD100K_MODEL_PREFIX)):
        if filename.startswith(scheme):
            name = filename[len(scheme) :]
            check_relative_name(name, what=f"{scheme} model name")
            return prefix + quote(name, safe="/")
    raise ValueError(f"{filename!r} is not an mmdet://, mmseg:// or bdd100k:// name")


@CheckpointLoader.register_scheme(prefixes=("modelzoo://", "torchvision://"))
def load_from_torchvision(filename: str, map_location: Any = None) -> Any:
    """Loads ``torchvision://NAME`` (or the deprecated ``modelzoo://NAME``).

    NAME is ``resnet50`` (torchvision 0.12 names), ``resnet50.imagenet1k_v1``,
    ``resnet50.default`` or ``ResNet50_Weights.IMAGENET1K_V1``.

    Raises:
        UnknownModelNameError: unknown name (a KeyError), with close matches.
        MissingDependencyError: the name is in no table and torchvision, whose weight enums
            would list it, is not installed (an ImportError).
    """
    if filename.startswith("modelzoo://"):
        warnings.warn(
            'The URL scheme "modelzoo://" is deprecated, please use "torchvision://" instead',
            FutureWarning,
            stacklevel=2,
        )
        name = filename[len("modelzoo://") :]
    else:
        name = filename[len("torchvision://") :]
    installed = _torchvision_installed()
    table, sources = _table("torchvision", _torchvision_enums if installed else None)
    for key in (name, name.lower().replace("_weights", "")):
        if key in table:
            return _load_entry(table[key], map_location, f"torchvision://{name}")
    user_table = cache_home() / _USER_TABLES["torchvision"]
    if not installed:
        error = _unknown("torchvision://", name, table, sources)
        raise MissingDependencyError(
            f"{error} torchvision is not installed, and its weight enums list the names "
            f"this table lacks: pip install torchvision, or add {name!r} with its URL to "
            f"{user_table}",
            name="torchvision",
        )
    raise _unknown(
        "torchvision://", name, table, sources, f" To add a name, put it in {user_table}."
    )


@CheckpointLoader.register_scheme(prefixes=("open-mmlab://", "openmmlab://"))
def load_from_openmmlab(filename: str, map_location: Any = None) -> Any:
    """Loads ``open-mmlab://NAME`` or ``openmmlab://NAME``; deprecated names redirect with a
    FutureWarning.

    Raises:
        UnknownModelNameError: unknown name, with close matches.
        UnsafePathError: the table entry is a path that leaves the cache home.
        CheckpointNotFoundError: the table entry is a path that does not exist.
    """
    scheme = "open-mmlab://" if filename.startswith("open-mmlab://") else "openmmlab://"
    name = filename[len(scheme) :]
    deprecated = get_deprecated_model_names()
    if name in deprecated:
        warnings.warn(
            f"{scheme}{name} is deprecated in favor of {scheme}{deprecated[name]}",
            FutureWarning,
            stacklevel=2,
        )
        name = deprecated[name]
    table, sources = _table("openmmlab")
    if name not in table:
        user_table = cache_home() / _USER_TABLES["openmmlab"]
        raise _unknown(scheme, name, table, sources, f" To add a name, put it in {user_table}.")
    return _load_entry(table[name], map_location, f"{scheme}{name}")


def _process_mmcls_checkpoint(checkpoint: Any, source: str) -> dict[str, Any]:
    """Keeps the ``backbone.`` weights of an mmcls checkpoint, without that prefix."""
    state_dict = find_state_dict(checkpoint, source)
    backbone: OrderedDict[str, Any] = OrderedDict(
        (key[len("backbone.") :], value)
        for key, value in state_dict.items()
        if key.startswith("backbone.")
    )
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        kept = OrderedDict()
        for key, value in metadata.items():
            if key == "backbone":
                kept[""] = value
            elif key.startswith("backbone."):
                kept[key[len("backbone.") :]] = value
        backbone._metadata = kept  # type: ignore[attr-defined]
    return {"state_dict": backbone}


@CheckpointLoader.register_scheme(prefixes="mmcls://")
def load_from_mmcls(filename: str, map_location: Any = None) -> Any:
    """Loads ``mmcls://NAME``: its ``backbone.`` weights with that prefix removed, as
    ``{"state_dict": ...}``.
    """
    name = filename[len("mmcls://") :]
    table, sources = _table("mmcls")
    if name not in table:
        user_table = cache_home() / _USER_TABLES["mmcls"]
        raise _unknown("mmcls://", name, table, sources, f" To add a name, put it in {user_table}.")
    checkpoint = _load_entry(table[name], map_location, f"mmcls://{name}")
    return _process_mmcls_checkpoint(checkpoint, filename)


@CheckpointLoader.register_scheme(prefixes="mmdet://")
def load_from_mmdet(filename: str, map_location: Any = None) -> Any:
    """Loads ``mmdet://PATH`` from OpenMMLab's mmdetection v2.0 downloads."""
    return load_from_http(resolve_zoo_url(filename), map_location=map_location)


@CheckpointLoader.register_scheme(prefixes="mmseg://")
def load_from_mmseg(filename: str, map_location: Any = None) -> Any:
    """Loads ``mmseg://PATH`` from OpenMMLab's mmsegmentation v0.5 downloads."""
    return load_from_http(resolve_zoo_url(filename), map_location=map_location)


@CheckpointLoader.register_scheme(prefixes="bdd100k://")
def load_from_bdd100k(filename: str, map_location: Any = None) -> Any:
    """Loads ``bdd100k://PATH`` from the BDD100K model zoo (dl.cv.ethz.ch)."""
    return load_from_http(resolve_zoo_url(filename), map_location=map_location)
