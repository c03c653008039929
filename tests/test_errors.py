"""The error hierarchy: builtin bases for old `except` clauses, data, messages, pickling."""

from __future__ import annotations

import errno
import pickle

import pytest
import torch

from ckptmap import errors
from ckptmap.errors import (
    CheckpointIsADirectoryError,
    CheckpointNotFoundError,
    CheckpointPermissionError,
    CkptmapError,
    InvalidStateDictError,
    LoadHookError,
    NoStateDictError,
    NothingLoadedWarning,
    PrefixNotFoundError,
    StateDictMismatchError,
)
from ckptmap.report import LoadResult, Mismatch

_RESULT = LoadResult.build(
    ["a.w", "bn.num_batches_tracked"],
    ["b.w"],
    [
        "size mismatch for c.w: copying a param with shape torch.Size([3]) from checkpoint, "
        "the shape in current model is torch.Size([2])."
    ],
    num_source_keys=2,
)

INSTANCES = [
    (CheckpointNotFoundError("/ckpt/a.pth"), FileNotFoundError),
    (CheckpointNotFoundError("/ckpt/link.pth", "a dangling link"), FileNotFoundError),
    (CheckpointIsADirectoryError("/ckpt"), IsADirectoryError),
    (CheckpointPermissionError("/ckpt/b.pth"), PermissionError),
    (NoStateDictError("/ckpt/c.pth", [1, 2]), RuntimeError),
    (InvalidStateDictError("bad"), TypeError),
    (PrefixNotFoundError("backbone.", "/ckpt/d.pth", ["neck", "head"]), ValueError),
    (StateDictMismatchError("mismatch", _RESULT), RuntimeError),
    (LoadHookError("returned a value"), AssertionError),
]


@pytest.mark.parametrize(("err", "builtin"), INSTANCES, ids=lambda x: type(x).__name__)
def test_is_ours_and_the_builtin(err, builtin):
    assert isinstance(err, CkptmapError)
    assert isinstance(err, builtin)
    with pytest.raises(builtin):
        raise err


@pytest.mark.parametrize(("err", "builtin"), INSTANCES, ids=lambda x: type(x).__name__)
def test_survives_pickling(err, builtin):
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err)
    assert str(copy) == str(err)
    assert {k: v for k, v in vars(copy).items() if k != "result"} == {
        k: v for k, v in vars(err).items() if k != "result"
    }


def test_file_errors_carry_path_and_errno():
    for err, code in [
        (CheckpointNotFoundError("/x/a.pth"), errno.ENOENT),
        (CheckpointIsADirectoryError("/x"), errno.EISDIR),
        (CheckpointPermissionError("/x/a.pth"), errno.EACCES),
    ]:
        assert err.errno == code
        assert err.filename == err.path
        assert err.path in str(err)
        assert not str(err).startswith("[Errno")


def test_not_found_message_says_what_to_do():
    text = str(CheckpointNotFoundError("/x/a.pth"))
    assert text == (
        "checkpoint file '/x/a.pth' can not be found: check the path, or that the file was "
        "downloaded or copied completely"
    )


def test_no_state_dict_names_the_type_not_the_value():
    err = NoStateDictError("/x/a.pth", torch.zeros(1000))
    assert str(err).startswith("No state_dict found in checkpoint file /x/a.pth")
    assert "torch.Tensor" in str(err) and err.found_type == "torch.Tensor"
    assert len(pickle.dumps(err)) < 1000  # the tensor itself is not kept
    assert "its top-level object is a list," in str(NoStateDictError("f", [1]))


def test_prefix_not_found_is_also_the_seeds_assertion():
    err = PrefixNotFoundError("backbone.", "/x/a.pth", ["neck", "head"])
    assert isinstance(err, AssertionError)
    assert str(err).startswith("backbone. is not in the pretrained model")
    assert "'neck', 'head'" in str(err)
    assert err.examples == ["neck", "head"]
    empty = PrefixNotFoundError("backbone.", "/x/a.pth", [])
    assert "the state dict is empty" in str(empty)


def test_mismatch_error_carries_the_keys():
    err = StateDictMismatchError("mismatch", _RESULT)
    assert err.missing == ["a.w"]  # num_batches_tracked is not reported
    assert err.unexpected == ["b.w"]
    assert err.mismatched == [Mismatch("c.w", (3,), (2,))]
    assert err.result is _RESULT


def test_warning_is_a_user_warning():
    assert issubclass(NothingLoadedWarning, UserWarning)


def test_exports_match_the_module():
    for name in errors.__all__:
        assert hasattr(errors, name)
