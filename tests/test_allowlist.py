"""The default allowlist: numpy values and mmengine's HistoryBuffer load with no opt-in, exactly
as pickle gives them; hostile pickles built from those same globals never run code; what callers
add can never be something that runs code.

Every file here is written by torch.save (zip and legacy) or pickle itself. The hostile ones are
real pickles of objects whose ``__reduce__`` hands numpy's, mmengine's and Python's real
functions crafted arguments: what an attacker would write. A sentinel file is the canary.
"""

from __future__ import annotations

import argparse
import builtins
import collections
import copyreg
import functools
import importlib
import operator
import os
import pathlib
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import mmengine.logging as mmengine_logging
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ckptmap
from ckptmap.errors import UnsafeAllowlistError, UnsafeCheckpointError
from ckptmap.formats import load_file
from ckptmap.formats.allowlist import (
    DEFAULT,
    MMENGINE_RUNNER,
    NUMPY,
    check_entry,
    globals_for,
    with_default,
)

HistoryBuffer = mmengine_logging.HistoryBuffer
MULTIARRAY = np._core.multiarray


def write(obj: Any, path: Path, container: str = "zip") -> Path:
    """`obj` written by the real tool for `container`."""
    if container == "zip":
        torch.save(obj, path)
    elif container == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


CONTAINERS = ["zip", "legacy", "pickle2"]


# -- numpy values load by default, exactly as pickle gives them -----------------------------------


def assert_same_numpy(ours: Any, ref: Any) -> None:
    assert type(ours) is type(ref)
    if isinstance(ref, np.ndarray):
        assert ours.dtype == ref.dtype and ours.dtype.str == ref.dtype.str
        assert ours.dtype.descr == ref.dtype.descr and ours.shape == ref.shape
        assert ours.flags.f_contiguous == ref.flags.f_contiguous
        assert ours.dtype.hasobject == ref.dtype.hasobject
        if ref.dtype.hasobject:
            assert ours.tolist() == ref.tolist()
        else:
            assert ours.tobytes() == ref.tobytes()
    elif isinstance(ref, np.dtype):
        assert ours == ref and ours.str == ref.str and ours.descr == ref.descr
        assert ours.flags == ref.flags and ours.isalignedstruct == ref.isalignedstruct
    elif isinstance(ref, np.generic):
        assert ours.dtype == ref.dtype and ours.tobytes() == ref.tobytes()
    else:
        assert ours == ref


dtypes = st.one_of(
    hnp.scalar_dtypes(),
    hnp.byte_string_dtypes(),
    hnp.unicode_string_dtypes(),
    hnp.datetime64_dtypes(),
    hnp.timedelta64_dtypes(),
    hnp.nested_dtypes(max_itemsize=64),
    hnp.scalar_dtypes().map(lambda d: d.newbyteorder(">")),
)


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    array=dtypes.flatmap(lambda d: hnp.arrays(d, hnp.array_shapes(min_dims=0, max_side=3))),
    fortran=st.booleans(),
    container=st.sampled_from(CONTAINERS),
)
def test_any_numpy_array_dtype_and_scalar_loads_as_pickle_gives_it(
    tmp_path_factory: pytest.TempPathFactory, array: np.ndarray, fortran: bool, container: str
) -> None:
    if fortran:
        array = np.asfortranarray(array)
    value = {"array": array, "dtype": array.dtype, "items": [array[()] if array.ndim == 0 else 0]}
    if array.size:
        value["scalar"] = array.reshape(-1)[0]
    path = write(value, tmp_path_factory.mktemp("np") / "v.pth", container)
    loaded = load_file(path)
    ref = pickle.loads(pickle.dumps(value, protocol=2))
    assert loaded.keys() == ref.keys()
    for key in ref:
        if key == "items":
            assert_same_numpy(loaded[key][0], ref[key][0])
        else:
            assert_same_numpy(loaded[key], ref[key])


@pytest.mark.parametrize("container", CONTAINERS)
def test_awkward_numpy_values(tmp_path: Path, container: str) -> None:
    titled = np.dtype({"names": ["a", "b"], "formats": ["<f4", "O"], "titles": ["A", None]})
    aligned = np.dtype([("x", "u1"), ("y", "<f8")], align=True)
    value = {
        "objects": np.array([1, "two", None, np.float32(3), np.array([4, 5])], dtype=object),
        "records": np.array([(1.5, "x"), (2.5, None)], dtype=titled),
        "aligned": np.zeros(2, dtype=aligned),
        "subarray": np.zeros(3, dtype=("<i2", (2, 3))),
        "dates": np.array(["2024-01-15", "NaT"], dtype="datetime64[10ms]"),
        "generic": np.dtype("M8"),
        "empty": np.zeros((0, 4)),
        "bytes": np.array([b"ab", b"c"]),
        "big": np.arange(6, dtype=">c16").reshape(2, 3),
        "int": np.int64(7),
        "str": np.str_("héllo"),
        "bool": np.bool_(True),
        "nested": {"in a tuple": (np.float16(1.5), [np.arange(3)])},
        "same twice": [np.dtype("f4")] * 2,
    }
    shared = np.arange(3)
    value["shared"] = [shared, shared]
    path = write(value, tmp_path / "awkward.pth", container)
    loaded = load_file(path)
    ref = pickle.loads(pickle.dumps(value, protocol=2))
    for key in ("records", "aligned", "subarray", "dates", "empty", "bytes", "big", "generic"):
        assert_same_numpy(loaded[key], ref[key])
    assert_same_numpy(loaded["int"], ref["int"])
    assert_same_numpy(loaded["str"], ref["str"])
    assert_same_numpy(loaded["bool"], ref["bool"])
    assert loaded["objects"].dtype == object and loaded["objects"][:4].tolist() == [
        1,
        "two",
        None,
        3,
    ]
    assert_same_numpy(loaded["objects"][3], ref["objects"][3])
    assert_same_numpy(loaded["objects"][4], ref["objects"][4])
    inner = loaded["nested"]["in a tuple"]
    assert type(inner) is tuple
    assert_same_numpy(inner[0], ref["nested"]["in a tuple"][0])
    assert_same_numpy(inner[1][0], ref["nested"]["in a tuple"][1][0])
    assert loaded["shared"][0] is loaded["shared"][1]  # shared references stay shared
    assert_same_numpy(loaded["same twice"][1], np.dtype("f4"))


def test_numpy_in_the_meta_of_a_torch_checkpoint_loads_with_its_tensors(tmp_path: Path) -> None:
    checkpoint = {
        "state_dict": {"weight": torch.arange(4.0).reshape(2, 2), "bias": torch.ones(2)},
        "meta": {"seed": np.int64(3), "mean": np.array([0.5, 0.25], dtype=np.float32)},
    }
    path = write(checkpoint, tmp_path / "meta.pth")
    model = torch.nn.Linear(2, 2)
    loaded = ckptmap.load_checkpoint(model, str(path), strict=True)
    assert torch.equal(model.weight, checkpoint["state_dict"]["weight"])
    assert_same_numpy(loaded["meta"]["seed"], np.int64(3))
    assert_same_numpy(loaded["meta"]["mean"], checkpoint["meta"]["mean"])


def test_the_default_allowlist_is_a_plain_tuple_of_pairs() -> None:
    # What torch.serialization.add_safe_globals takes, and what load_pickle hands on.
    assert isinstance(DEFAULT, tuple) and DEFAULT == MMENGINE_RUNNER
    assert set(NUMPY) <= set(DEFAULT)
    for entry in DEFAULT:
        assert isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], str)
        assert callable(entry[0])
    assert {name for _, name in DEFAULT} >= {
        "numpy.ndarray",
        "numpy.dtype",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray.scalar",
        "mmengine.logging.history_buffer.HistoryBuffer",
        "builtins.getattr",
    }
    assert with_default() is DEFAULT
    assert with_default([argparse.Namespace]) == (*DEFAULT, argparse.Namespace)


def test_import_ckptmap_reaches_the_allowlist_and_imports_no_mmengine() -> None:
    script = textwrap.dedent(
        """
        import sys, ckptmap
        assert ckptmap.formats.allowlist.DEFAULT
        assert ckptmap.UnsafeAllowlistError
        assert not [m for m in sys.modules if m.split(".")[0] in ("mmengine", "mmcv")]
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# -- HistoryBuffer ----------------------------------------------------------------------------


def message_hub_state() -> dict[str, Any]:
    hub = mmengine_logging.MessageHub(f"ckptmap-allowlist-{id(object())}")
    for step in range(5):
        hub.update_scalar("train/loss", 1.0 / (step + 1))
        hub.update_scalar("train/lr", np.float32(0.1), count=2)
    hub.update_info("iter", np.int64(40))
    return hub.state_dict()


@pytest.mark.parametrize("container", CONTAINERS)
def test_history_buffers_load_as_mmengine_buffers(tmp_path: Path, container: str) -> None:
    state = message_hub_state()
    path = write({"message_hub": state}, tmp_path / "hub.pth", container)
    before = dict(HistoryBuffer._statistics_methods)
    loaded = load_file(path)["message_hub"]
    assert HistoryBuffer._statistics_methods == before
    for name, ref in state["log_scalars"].items():
        ours = loaded["log_scalars"][name]
        assert type(ours) is HistoryBuffer
        assert ours.max_length == ref.max_length
        assert_same_numpy(ours.data[0], ref.data[0])
        assert_same_numpy(ours.data[1], ref.data[1])
        assert ours.mean() == ref.mean() and ours.statistics("min") == ref.statistics("min")
    # And mmengine takes them back.
    hub = mmengine_logging.MessageHub(f"ckptmap-allowlist-back-{id(path)}")
    hub.load_state_dict(loaded)
    assert hub.get_scalar("train/loss").current() == 0.2


# -- hostile pickles built from the allowed globals ---------------------------------------------


class Reduce:
    """Pickles as ``func(*args)``, then BUILD `state` if given: any call a pickle can make."""

    def __init__(self, func: Any, args: tuple[Any, ...], state: Any = None) -> None:
        self.value = (func, args) if state is None else (func, args, state)

    def __reduce__(self) -> Any:
        return self.value


def dtype_of(spec: str, state: tuple[Any, ...]) -> Reduce:
    return Reduce(np.dtype, (spec, False, True), state)


def array_of(dtype: Any, data: Any, shape: tuple[int, ...] = (1,), sub: Any = np.ndarray) -> Reduce:
    return Reduce(MULTIARRAY._reconstruct, (sub, (0,), b"b"), (1, shape, dtype, False, data))


class NewObj:
    """Pickles as NEWOBJ of `cls` with `args`, then BUILD `state`: what protocol 2 writes for
    an instance, with whatever state an attacker likes."""

    def __init__(self, cls: type, args: tuple[Any, ...], state: Any = None) -> None:
        self.cls, self.args, self.state = cls, args, state

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # the pickler checks that NEWOBJ's class is the object's
        return self.cls

    def __reduce__(self) -> Any:
        return (copyreg.__newobj__, (self.cls, *self.args), self.state)


def new_buffer(state: Any) -> NewObj:
    return NewObj(HistoryBuffer, (), state)


def good_buffer_state(**changes: Any) -> dict[str, Any]:
    state = {
        "max_length": 10,
        "_log_history": np.array([1.0, 2.0]),
        "_count_history": np.array([1, 1]),
        "statistics_methods": {"mean": HistoryBuffer.mean},
    }
    state.update(changes)
    return state


NO_OBJECT_FLAGS = (3, "|", None, None, None, -1, -1, 0)


def hostile(sentinel: Path) -> dict[str, Any]:
    """Pickles that use only default-allowed globals (plus, last, a code-running one)."""
    touch = f"__import__('pathlib').Path({str(sentinel)!r}).touch()"
    return {
        # An object dtype whose flags claim no objects, then raw bytes read as pointers.
        "object dtype without its flags": array_of(dtype_of("O8", NO_OBJECT_FLAGS), b"A" * 8),
        "structured object field, flags cleared": array_of(
            dtype_of("V8", (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0)), b"A" * 8
        ),
        "object sub-array, flags cleared": array_of(
            dtype_of("V8", (3, "|", (np.dtype("O"), (1,)), None, None, 8, 1, 0)), b"A" * 8
        ),
        "fields on a float dtype": dtype_of(
            "f8", (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0)
        ),
        "field beyond the item size": array_of(
            dtype_of("V8", (3, "|", None, ("a",), {"a": (np.dtype("f8"), 4096)}, 8, 1, 0)),
            b"\0" * 8,
        ),
        "overlapping object fields": dtype_of(
            "V16",
            (
                3,
                "|",
                None,
                ("a", "b"),
                {"a": (np.dtype("O"), 0), "b": (np.dtype("O"), 4)},
                16,
                1,
                63,
            ),
        ),
        "short data for the shape": array_of(dtype_of("f8", NO_OBJECT_FLAGS), b"\0" * 8, (100,)),
        "object array from bytes": array_of(np.dtype("O"), b"A" * 8),
        "_reconstruct of another class": array_of(
            dtype_of("f8", NO_OBJECT_FLAGS), b"", (0,), HistoryBuffer
        ),
        "_reconstruct with a huge shape": Reduce(
            MULTIARRAY._reconstruct, (np.ndarray, (2**62,), b"b")
        ),
        "ndarray created directly": NewObj(np.ndarray, ((2**40,),)),
        "scalar from too few bytes": Reduce(
            MULTIARRAY.scalar, (dtype_of("f8", NO_OBJECT_FLAGS), b"\0")
        ),
        "scalar of a crafted object dtype": Reduce(
            MULTIARRAY.scalar,
            (dtype_of("V8", (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0)), b"A" * 8),
        ),
        "dtype from a non-str spec": Reduce(np.dtype, (HistoryBuffer, False, True)),
        "dtype with a bogus state": Reduce(np.dtype, ("f8", False, True), ("<", 3)),
        "dtype with a bad datetime unit": dtype_of(
            "M8", (4, "<", None, None, None, -1, -1, 0, (None, (b"eons", 1, 1, 1)))
        ),
        # getattr chains through allowed objects.
        "getattr of a private method": Reduce(getattr, (HistoryBuffer, "_set_default_statistics")),
        "getattr of __init__": Reduce(getattr, (HistoryBuffer, "__init__")),
        "getattr of a method's globals": Reduce(
            getattr, (Reduce(getattr, (HistoryBuffer, "mean")), "__globals__")
        ),
        "getattr of update": Reduce(getattr, (HistoryBuffer, "update")),
        "getattr on OrderedDict": Reduce(getattr, (collections.OrderedDict, "fromkeys")),
        "getattr on a rebuild function": Reduce(
            getattr, (torch._utils._rebuild_tensor_v2, "__globals__")
        ),
        "getattr with a default": Reduce(getattr, (HistoryBuffer, "mean", None)),
        # BUILD on allowed classes with crafted state.
        "buffer with a dunder attribute": new_buffer(
            good_buffer_state(__class__=collections.OrderedDict)
        ),
        "buffer with __reduce_ex__": new_buffer(good_buffer_state(__reduce_ex__=MULTIARRAY.scalar)),
        "buffer with slot state": new_buffer(
            (good_buffer_state(), {"__class__": collections.Counter})
        ),
        "buffer poisoning the shared methods": new_buffer(
            good_buffer_state(statistics_methods={"mean": MULTIARRAY.scalar})
        ),
        "buffer adding a method": new_buffer(
            good_buffer_state(statistics_methods={"evil": torch._utils._rebuild_tensor_v2})
        ),
        "buffer with an object history": new_buffer(
            good_buffer_state(_log_history=np.array([print], dtype=object))
        ),
        "buffer built with arguments": NewObj(HistoryBuffer, ([1.0], [1]), good_buffer_state()),
        "buffer called": Reduce(HistoryBuffer, ([1.0], [1])),
        # And the classic, next to allowed globals.
        "os.system next to allowed globals": {
            "hub": message_hub_state(),
            "x": np.float64(1),
            "evil": Reduce(os.system, (f"touch {sentinel}",)),
        },
        "eval next to allowed globals": [np.int64(1), Reduce(eval, (touch,))],
        "bound method through getattr": Reduce(getattr, (pathlib.Path(sentinel), "touch")),
    }


HOSTILE = sorted(hostile(Path("/nonexistent")))


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_pickles_never_run_code(tmp_path: Path, case: str, container: str) -> None:
    sentinel = tmp_path / "PWNED"
    payload = hostile(sentinel)[case]
    path = write(
        {"state_dict": {"w": torch.ones(2)}, "meta": payload}, tmp_path / "e.pth", container
    )
    before = dict(HistoryBuffer._statistics_methods)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_file(path)
    assert not sentinel.exists(), "the payload ran"
    assert HistoryBuffer._statistics_methods == before, "the shared methods changed"
    message = str(info.value)
    assert str(path) in message
    assert "weights_only=False" not in message or info.value.globals, message
    # Allowing more never lets these through: not numpy's raw functions, not a user class.
    raw_numpy = [
        MULTIARRAY._reconstruct,
        np.ndarray,
        np.dtype,
        type(np.dtype("O")),
        MULTIARRAY.scalar,
    ]
    with pytest.raises(UnsafeCheckpointError):
        load_file(path, allowed_globals=[*raw_numpy, argparse.Namespace])
    assert not sentinel.exists()


def test_the_numpy_hole_is_real_with_a_raw_numpy_allowlist(tmp_path: Path) -> None:
    # The control: torch's usual advice (allow numpy's own functions) lets this file make
    # numpy read bytes of the file as object pointers; the process dies.
    path = write(
        {"meta": hostile(tmp_path / "x")["object dtype without its flags"]}, tmp_path / "e.pth"
    )
    script = textwrap.dedent(
        f"""
        import numpy as np, torch
        m = np._core.multiarray
        raw = [m._reconstruct, np.ndarray, np.dtype, type(np.dtype("O"))]
        with torch.serialization.safe_globals(raw):
            array = torch.load({str(path)!r}, weights_only=True)["meta"]
        print(array.dtype.hasobject, flush=True)
        print(array[0])
        """
    )
    run = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True
    )
    assert run.stdout.startswith("False"), run.stdout + run.stderr
    assert run.returncode < 0, "numpy dereferenced 0x4141414141414141 and the process survived?"
    with pytest.raises(UnsafeCheckpointError, match="refusing"):
        load_file(path)


@pytest.mark.parametrize("kind", ["os.system", "eval", "getattr"])
def test_classic_payloads_are_named_as_malicious(tmp_path: Path, kind: str) -> None:
    sentinel = tmp_path / "PWNED"
    payload = {
        "os.system": Reduce(os.system, (f"touch {sentinel}",)),
        "eval": Reduce(eval, ("1",)),
        "getattr": Reduce(getattr, (pathlib.Path(sentinel), "touch")),
    }[kind]
    path = write({"x": payload}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="malicious") as info:
        load_file(path)
    assert info.value.dangerous and not sentinel.exists()


# -- what callers add is checked ------------------------------------------------------------------

CODE_RUNNING = [
    eval,
    exec,
    compile,
    getattr,
    setattr,
    builtins.__import__,
    builtins.open,
    type,
    os.system,
    os.popen,
    subprocess.Popen,
    subprocess.run,
    subprocess.check_output,
    importlib.import_module,
    functools.partial,
    functools.reduce,
    operator.attrgetter,
    operator.methodcaller,
    pickle.loads,
    torch.load,
    np.load,
    str.format,
    pathlib.Path("/tmp/x").unlink,
    copyreg._reconstructor,
]


@pytest.mark.parametrize("obj", CODE_RUNNING, ids=lambda o: getattr(o, "__qualname__", repr(o)))
def test_code_running_callables_are_refused_even_on_purpose(tmp_path: Path, obj: Any) -> None:
    missing = str(tmp_path / "never-read.pth")
    for entry in (obj, (obj, "mypkg.harmless")):
        with pytest.raises(UnsafeAllowlistError) as info:
            check_entry(entry)
        assert isinstance(info.value, ValueError)
        # Every entry point checks before it reads anything (the file does not exist).
        for load in (
            lambda a: load_file(missing, allowed_globals=a),
            lambda a: ckptmap.load_checkpoint(torch.nn.Linear(1, 1), missing, allowed_globals=a),
            lambda a: ckptmap._load_checkpoint(missing, allowed_globals=a),
            lambda a: ckptmap._load_checkpoint_with_prefix("x", missing, allowed_globals=a),
            lambda a: ckptmap.load_model_checkpoint(
                torch.nn.Linear(1, 1), missing, allowed_globals=a
            ),
            lambda a: ckptmap.CheckpointLoader.load_checkpoint(missing, allowed_globals=a),
        ):
            with pytest.raises(UnsafeAllowlistError):
                load([entry])


def test_names_modules_and_strings_are_refused() -> None:
    with pytest.raises(UnsafeAllowlistError, match=r"allowed_globals=\[argparse\.Namespace\]"):
        check_entry("argparse.Namespace")
    with pytest.raises(UnsafeAllowlistError, match="module"):
        check_entry(argparse)
    with pytest.raises(UnsafeAllowlistError, match="not a name"):
        with_default("argparse.Namespace")
    with pytest.raises(UnsafeAllowlistError, match="neither a class nor a function"):
        check_entry(3)


def test_data_classes_of_guarded_modules_are_allowed() -> None:
    for cls in (argparse.Namespace, pathlib.PosixPath, collections.OrderedDict, print):
        assert check_entry(cls) is cls
    import types

    assert check_entry(types.SimpleNamespace) is types.SimpleNamespace
    assert globals_for(["argparse.Namespace", "numpy"]) == [
        (argparse.Namespace, "argparse.Namespace"),
        *NUMPY,
    ]
    for bad in ("os.system", "builtins.getattr", "subprocess.Popen", "functools.partial"):
        with pytest.raises(UnsafeAllowlistError):
            globals_for([bad])
    with pytest.raises(KeyError):
        globals_for(["no_such_module_xyz.Thing"])


# -- the advice names an argument that exists where the user called from --------------------------


@pytest.fixture
def namespace_checkpoint(tmp_path: Path) -> Path:
    return write(
        {
            "state_dict": {"weight": torch.ones(1, 1), "bias": torch.ones(1)},
            "args": argparse.Namespace(lr=0.1),
        },
        tmp_path / "ns.pth",
    )


API_LOADS = {
    "load_checkpoint": lambda p, **k: ckptmap.load_checkpoint(torch.nn.Linear(1, 1), p, **k),
    "_load_checkpoint": lambda p, **k: ckptmap._load_checkpoint(p, **k),
    "_load_checkpoint_with_prefix": lambda p, **k: ckptmap._load_checkpoint_with_prefix("", p, **k),
    "load_model_checkpoint": lambda p, **k: ckptmap.load_model_checkpoint(
        torch.nn.Linear(1, 1), p, **k
    ),
    "CheckpointLoader": lambda p, **k: ckptmap.CheckpointLoader.load_checkpoint(p, **k),
    "load_file": lambda p, **k: load_file(p, **k),
}


@pytest.mark.parametrize("entry", sorted(API_LOADS))
def test_api_advice_names_allowed_globals_and_following_it_works(
    namespace_checkpoint, entry
) -> None:
    load = API_LOADS[entry]
    with pytest.raises(UnsafeCheckpointError) as info:
        load(str(namespace_checkpoint))
    message = str(info.value)
    assert "allowed_globals=[argparse.Namespace]" in message and "--allow" not in message
    load(str(namespace_checkpoint), allowed_globals=[argparse.Namespace])


@pytest.mark.parametrize("command", ["inspect", "diff", "convert"])
def test_cli_advice_names_allow_and_following_it_works(
    namespace_checkpoint, command: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from ckptmap.cli import main

    args = {
        "inspect": [str(namespace_checkpoint)],
        "diff": [str(namespace_checkpoint), "--against", str(namespace_checkpoint)],
        "convert": [str(namespace_checkpoint), str(tmp_path / "out.pth")],
    }[command]
    assert main([command, *args]) != 0
    err = capsys.readouterr().err
    assert "--allow argparse.Namespace" in err and "allowed_globals" not in err
    assert main([command, *args, "--allow", "argparse.Namespace"]) == 0
    with pytest.raises(SystemExit):
        main([command, *args, "--allow", "builtins.eval"])
    assert "can not include builtins.eval" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_dcp_object_entries_get_the_default_allowlist(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from ckptmap.formats.dcp import DcpCheckpoint

    directory = tmp_path / "dcp"
    state = {"w": torch.ones(2), "extra": {"seed": np.int64(3), "mean": np.arange(3.0)}}
    dcp.save(state, checkpoint_id=str(directory))
    loaded = load_file(directory)
    assert_same_numpy(loaded["extra"]["seed"], np.int64(3))
    assert_same_numpy(loaded["extra"]["mean"], np.arange(3.0))
    for load in (
        lambda: load_file(directory, allowed_globals=[eval]),
        lambda: DcpCheckpoint(directory, allowed_globals=[os.system]),
    ):
        with pytest.raises(UnsafeAllowlistError):
            load()
