"""The error contract, walked site by site: every public function, scheme, format and save path,
fed the bad input that makes it raise, raises a `CkptmapError` that is also the builtin the seeds
(mmengine, mmcv 1.x, torch) raise there — so ``except CkptmapError`` catches everything ckptmap
reports and old ``except FileNotFoundError:`` clauses keep working.

Each case is one raise site: its inputs are made for real here (files written by torch, a
TorchScript archive, a pickle that would run a command, a real HTTP server answering 404, a
stand-in pavi client that downloads nothing). Sites owned by other parts of the package that
still raise a bare builtin are pinned as strict xfails naming the site, so fixing one flips
its case to a failure until the mark is removed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import sys
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from servers import checkpoint_bytes, checkpoint_server
from torch import nn

import ckptmap
from ckptmap import CkptmapError
from ckptmap.cli.convert import convert, parse_dtype
from ckptmap.formats import load_file, validate_state_dict
from ckptmap.formats.safetensors import SafetensorsFile
from ckptmap.save import parse_size, save_checkpoint
from ckptmap.schemes import (
    CheckpointLoader,
    load_from_ceph,
    load_from_local,
    load_from_mmcls,
    load_from_openmmlab,
    load_from_pavi,
    load_from_petrel,
    load_from_torchvision,
)

# --- inputs ------------------------------------------------------------------------------------


class RunsACommand:
    def __reduce__(self):
        return (os.system, ("true",))


@dataclass
class Inputs:
    """Bad inputs, made once per test in its own directory."""

    root: Path

    def file(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path

    @property
    def good(self) -> Path:
        path = self.root / "good.pth"
        if not path.exists():
            torch.save({"state_dict": {"w": torch.ones(2)}, "meta": {}}, path)
        return path

    @property
    def list_checkpoint(self) -> Path:
        path = self.root / "list.pth"
        torch.save([torch.ones(1)], path)
        return path

    @property
    def torchscript(self) -> Path:
        path = self.root / "script.pt"
        with warnings.catch_warnings():  # torch deprecates TorchScript; the files still exist
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(torch.jit.script(nn.Linear(1, 1)), path)
        return path

    @property
    def malicious(self) -> Path:
        path = self.root / "evil.pth"
        torch.save({"state_dict": {}, "x": RunsACommand()}, path)
        return path

    @property
    def empty_dir(self) -> Path:
        path = self.root / "empty_dir"
        path.mkdir(exist_ok=True)
        return path

    def index(self, document: Any, name: str = "m.safetensors.index.json") -> Path:
        return self.file(name, json.dumps(document).encode())


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTMAP_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(sys.modules, "petrel_client", None)  # whatever the machine has
    return Inputs(tmp_path)


@dataclass(frozen=True)
class Site:
    """One raise site: the call (given the inputs) and the builtin the seeds raise there."""

    name: str
    call: Callable[[Inputs], Any]
    builtin: type[BaseException]


def pinned(site: Site, owner: str) -> Any:
    """A site outside this suite's scope that still raises a bare builtin (a strict xfail)."""
    reason = f"{site.name}: raises a bare {site.builtin.__name__} ({owner})"
    return pytest.param(site, id=site.name, marks=pytest.mark.xfail(strict=True, reason=reason))


def strict_model() -> nn.Module:
    return nn.Linear(3, 3)


# --- the sites -----------------------------------------------------------------------------------

LOADING = [
    Site("load_file: missing", lambda i: load_file(i.root / "nope.pth"), FileNotFoundError),
    Site("load_file: a directory", lambda i: load_file(i.empty_dir), IsADirectoryError),
    Site(
        "load_file: dangling symlink",
        lambda i: (i.root / "l.pth").symlink_to("gone.pth") or load_file(i.root / "l.pth"),
        FileNotFoundError,
    ),
    Site("load_file: empty", lambda i: load_file(i.file("e.pth", b"")), RuntimeError),
    Site(
        "load_file: an HTML page",
        lambda i: load_file(i.file("p.pth", b"<!DOCTYPE html><html>login</html>")),
        RuntimeError,
    ),
    Site(
        "load_file: truncated zip",
        lambda i: load_file(i.file("t.pth", i.good.read_bytes()[:100])),
        RuntimeError,
    ),
    Site("load_file: TorchScript", lambda i: load_file(i.torchscript), RuntimeError),
    Site("load_file: malicious pickle", lambda i: load_file(i.malicious), pickle.UnpicklingError),
    Site(
        "load_file: bad safetensors header",
        lambda i: load_file(i.file("b.safetensors", (8).to_bytes(8, "little") + b"{not json")),
        ValueError,
    ),
    Site(
        "load_file: index mapping a tensor to a number",
        lambda i: load_file(i.index({"weight_map": {"w": 1}})),
        ValueError,
    ),
    Site(
        "load_file: index escaping its directory",
        lambda i: load_file(i.index({"weight_map": {"w": "../x.safetensors"}})),
        ValueError,
    ),
    Site(
        "load_file: index naming a missing shard",
        lambda i: load_file(i.index({"weight_map": {"w": "s-00001-of-00001.safetensors"}})),
        FileNotFoundError,
    ),
    Site(
        "load_file: two indexes in a directory",
        lambda i: (
            i.index({"weight_map": {}}, "a.bin.index.json"),
            i.index({"weight_map": {}}, "b.bin.index.json"),
            load_file(i.root),
        ),
        ValueError,
    ),
    Site(
        "SafetensorsFile: missing tensor",
        lambda i: (
            save_checkpoint({"w": torch.ones(1)}, i.root / "s.safetensors"),
            SafetensorsFile(i.root / "s.safetensors")["nope"],
        ),
        KeyError,
    ),
    Site("validate_state_dict: not a mapping", lambda i: validate_state_dict([1], "x"), TypeError),
    Site("find_state_dict: a list", lambda i: ckptmap.find_state_dict([1], "x"), RuntimeError),
    Site(
        "load_checkpoint: missing",
        lambda i: ckptmap.load_checkpoint(strict_model(), i.root / "nope.pth"),
        FileNotFoundError,
    ),
    Site(
        "load_checkpoint: no state dict",
        lambda i: ckptmap.load_checkpoint(strict_model(), i.list_checkpoint),
        RuntimeError,
    ),
    Site(
        "load_checkpoint: strict mismatch",
        lambda i: ckptmap.load_checkpoint(strict_model(), i.good, strict=True, logger="silent"),
        RuntimeError,
    ),
    Site(
        "load_state_dict: strict mismatch",
        lambda i: ckptmap.load_state_dict(strict_model(), {"x": torch.ones(1)}, strict=True),
        RuntimeError,
    ),
    Site(
        "_load_checkpoint_with_prefix: no such prefix",
        lambda i: ckptmap._load_checkpoint_with_prefix("backbone", i.good),
        AssertionError,
    ),
]

SCHEMES = [
    Site(
        "CheckpointLoader: unknown scheme",
        lambda i: CheckpointLoader.load_checkpoint("nope://x.pth"),
        ValueError,
    ),
    Site(
        "register_scheme: taken prefix",
        lambda i: CheckpointLoader.register_scheme("http://", lambda f, m: None),
        KeyError,
    ),
    Site(
        "register_scheme: prefixes of the wrong type",
        lambda i: CheckpointLoader.register_scheme(3, lambda f, m: None),
        AssertionError,
    ),
    Site("load_from_local: missing", lambda i: load_from_local("~/nope/x.pth"), FileNotFoundError),
    Site("load_from_pavi: not pavi://", lambda i: load_from_pavi("x/c.pth"), AssertionError),
    Site("load_from_pavi: no pavi", lambda i: load_from_pavi("pavi://m/c.pth"), ImportError),
    Site("load_from_petrel: no petrel", lambda i: load_from_petrel("petrel://b/k"), ImportError),
    Site(
        "load_from_ceph: unknown backend",
        lambda i: load_from_ceph("s3://b/k.pth", backend="ceph"),
        ValueError,
    ),
    Site(
        "load_from_ceph: no key",
        lambda i: load_from_ceph("s3://bucket", backend="boto3"),
        ValueError,
    ),
    Site(
        "load_from_ceph: a key escaping the cache",
        lambda i: load_from_ceph("s3://b/../x.pth", backend="boto3"),
        ValueError,
    ),
    Site(
        "load_from_torchvision: unknown name",
        lambda i: load_from_torchvision("torchvision://no_such_net"),
        # Without torchvision, the name tables it brings are missing: an ImportError says so.
        KeyError if importlib.util.find_spec("torchvision") else ImportError,
    ),
    Site(
        "load_from_openmmlab: unknown name",
        lambda i: load_from_openmmlab("open-mmlab://no_such_net"),
        KeyError,
    ),
    Site("load_from_mmcls: unknown name", lambda i: load_from_mmcls("mmcls://no_such"), KeyError),
]


class ReturnsFromHook(nn.Linear):
    def __init__(self) -> None:
        super().__init__(1, 1)
        self.register_state_dict_post_hook(lambda *args: {"x": 1})


SAVING = [
    Site(
        "save_checkpoint: meta not a dict",
        lambda i: save_checkpoint(nn.Linear(1, 1), i.root / "no" / "x.pth", meta="invalid"),
        TypeError,
    ),
    Site(
        "save_checkpoint: optimizer not one",
        lambda i: save_checkpoint(nn.Linear(1, 1), i.root / "x.pth", optimizer="adam"),
        TypeError,
    ),
    Site(
        "save_checkpoint: extra argument",
        lambda i: save_checkpoint({}, i.root / "x.pth", None, None, "extra"),
        TypeError,
    ),
    Site(
        "save_checkpoint: file_client_args and backend_args",
        lambda i: save_checkpoint({}, i.root / "x.pth", file_client_args={}, backend_args={}),
        ValueError,
    ),
    Site(
        "save_checkpoint: backend_args not a dict",
        lambda i: save_checkpoint({}, i.root / "x.pth", backend_args="local"),
        TypeError,
    ),
    Site("save_checkpoint: filename not a path", lambda i: save_checkpoint({}, 3), TypeError),
    Site("save_checkpoint: pavi://", lambda i: save_checkpoint({}, "pavi://m/x.pth"), ValueError),
    Site("save_checkpoint: http://", lambda i: save_checkpoint({}, "http://h/x.pth"), ValueError),
    Site(
        "save_checkpoint: s3:// without a key", lambda i: save_checkpoint({}, "s3://b"), ValueError
    ),
    Site(
        "save_checkpoint: local backend for s3://",
        lambda i: save_checkpoint({}, "s3://b/x.pth", backend_args={"backend": "local"}),
        ValueError,
    ),
    Site(
        "save_checkpoint: petrel backend for a local path",
        lambda i: save_checkpoint({}, i.root / "x.pth", backend_args={"backend": "petrel"}),
        ValueError,
    ),
    Site(
        "save_checkpoint: arguments the backend does not take",
        lambda i: save_checkpoint({}, i.root / "x.pth", backend_args={"bucket": "b"}),
        TypeError,
    ),
    Site(
        "save_checkpoint: petrel asked for, not installed",
        lambda i: save_checkpoint({}, "s3://b/x.pth", backend_args={"backend": "petrel"}),
        ImportError,
    ),
    Site(
        "save_checkpoint: a tensor in safetensors metadata",
        lambda i: save_checkpoint(
            {"state_dict": {}, "meta": {"t": torch.ones(1)}}, i.root / "x.safetensors"
        ),
        TypeError,
    ),
    Site(
        "save_checkpoint: a dtype safetensors lacks",
        lambda i: save_checkpoint(
            {"w": torch.ones(1, dtype=torch.complex128)}, i.root / "x.safetensors"
        ),
        TypeError,
    ),
    Site(
        "save_checkpoint: an index name without max_shard_size",
        lambda i: save_checkpoint({}, i.root / "x.safetensors.index.json"),
        ValueError,
    ),
    Site(
        "save_checkpoint: total_size entry in a sharded save",
        lambda i: save_checkpoint(
            {"state_dict": {}, "total_size": 1}, i.root / "x.pth", max_shard_size=10
        ),
        ValueError,
    ),
    Site(
        "save_checkpoint: a directory",
        lambda i: save_checkpoint({}, i.empty_dir),
        IsADirectoryError,
    ),
    Site(
        "save_checkpoint: a symlink loop",
        lambda i: (
            (i.root / "a.pth").symlink_to("a.pth"),
            save_checkpoint({}, i.root / "a.pth"),
        ),
        OSError,
    ),
    Site("parse_size: not a size", lambda i: parse_size("lots"), ValueError),
    Site("parse_size: not a number", lambda i: parse_size(1.5), TypeError),
    Site(
        "get_state_dict: a hook returning",
        lambda i: ckptmap.get_state_dict(ReturnsFromHook()),
        RuntimeError,
    ),
    Site("convert: unknown dtype", lambda i: parse_dtype("int8"), ValueError),
    Site(
        "convert: dropping an entry that is not there",
        lambda i: convert(i.good, i.root / "o.pth", drop=["nope"]),
        ValueError,
    ),
]

ELSEWHERE = [
    Site(
        "KeyRules: a pattern that does not compile",
        lambda i: ckptmap.KeyRules([("(", "")]),
        re.error,
    ),
    Site(
        "KeyRules: a replacement that does not parse",
        lambda i: ckptmap.KeyRules([("a", r"\1")]),
        re.error,
    ),
    Site(
        "rotate_checkpoints: keep_last < 1",
        lambda i: ckptmap.rotate_checkpoints(i.root, keep_last=0),
        ValueError,
    ),
]


@pytest.mark.parametrize(
    "site", [pytest.param(s, id=s.name) for s in LOADING + SCHEMES + SAVING] + ELSEWHERE
)
def test_every_raise_site_keeps_the_contract(inputs, site):
    with pytest.raises(BaseException) as info:
        site.call(inputs)
    err = info.value
    assert isinstance(err, CkptmapError), f"{site.name}: {type(err).__mro__}"
    assert isinstance(err, site.builtin), f"{site.name}: {type(err).__mro__}"
    assert str(err), "a message"


def test_load_from_pavi_downloading_nothing_is_file_not_found(inputs, monkeypatch):
    """mmengine's test: a pavi client whose download writes nothing -> FileNotFoundError."""
    model = types.SimpleNamespace(name="checkpoint.pth", download=lambda path: None)
    modelcloud = types.SimpleNamespace(get=lambda path: model)
    monkeypatch.setitem(sys.modules, "pavi", types.SimpleNamespace(modelcloud=modelcloud))
    with pytest.raises(FileNotFoundError) as info:
        load_from_pavi("pavi://checkpoint.pth")
    assert isinstance(info.value, CkptmapError) and "downloaded nothing" in str(info.value)


def test_http_404_keeps_the_contract(inputs):
    with checkpoint_server() as server:
        server.add("/ok.pth", checkpoint_bytes())
        with pytest.raises(FileNotFoundError) as info:
            CheckpointLoader.load_checkpoint(server.url("/missing.pth"))
    assert isinstance(info.value, CkptmapError)


def test_every_error_class_is_ours_and_a_builtin():
    """Every exception class ckptmap defines subclasses CkptmapError and some builtin."""
    import builtins

    from ckptmap import errors

    builtin_errors = (
        pickle.UnpicklingError,
        re.error,  # what re.sub raises for a bad rule
        *(c for c in vars(builtins).values() if isinstance(c, type) and issubclass(c, Exception)),
    )
    for name in errors.__all__:
        cls = getattr(errors, name)
        if issubclass(cls, Warning):
            continue
        assert issubclass(cls, CkptmapError), name
        if cls is not CkptmapError:
            bases = [b for b in cls.__mro__[1:] if b in builtin_errors and b is not Exception]
            assert bases, f"{name} subclasses no builtin error besides Exception"
