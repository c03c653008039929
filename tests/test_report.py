"""The load report: folding key lists into patterns, the flat and folded messages."""

from __future__ import annotations

import itertools
import logging
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from ckptmap.report import (
    LoadResult,
    Mismatch,
    fold_keys,
    format_report,
    log_message,
    parse_size_mismatch,
)
from ckptmap.revise import Collision

_BRACES = re.compile(r"\{([^}]*)\}")


def expand(pattern: str) -> list[str]:
    """The keys a folded pattern stands for (the inverse of `fold_keys`, for the tests)."""
    choices: list[list[str]] = []
    for match in _BRACES.finditer(pattern):
        values: list[str] = []
        for part in match.group(1).split(","):
            if ".." in part:
                lo, hi = part.split("..")
                values.extend(str(v) for v in range(int(lo), int(hi) + 1))
            else:
                values.append(part)
        choices.append(values)
    template = _BRACES.sub("{}", pattern)
    return [template.format(*combo) for combo in itertools.product(*choices)]


_component = st.one_of(
    st.integers(0, 40).map(str),
    st.sampled_from(["layers", "experts", "w1", "weight", "bias", "01", "007", "x-y", "²", "٣"]),
)
_keys = st.lists(st.lists(_component, min_size=1, max_size=5).map(".".join), max_size=80)


@given(_keys)
def test_folding_covers_exactly_the_keys(keys):
    folded = fold_keys(keys)
    expanded = [key for pattern, _ in folded for key in expand(pattern)]
    assert sorted(expanded) == sorted(set(keys))  # every key once, nothing invented
    assert sum(count for _, count in folded) == len(set(keys))
    assert all(count == len(expand(pattern)) for pattern, count in folded)


def test_full_grid_folds_to_one_line():
    keys = [f"layers.{i}.experts.{j}.w1.weight" for i in range(32) for j in range(256)]
    assert fold_keys(keys) == [("layers.{0..31}.experts.{0..255}.w1.weight", 8192)]


def test_holes_and_runs():
    keys = [f"layers.{i}.experts.{j}.w" for i in range(4) for j in range(6) if (i, j) != (2, 3)]
    assert fold_keys(keys) == [
        ("layers.{0,1,3}.experts.{0..5}.w", 18),
        ("layers.2.experts.{0..2,4,5}.w", 5),
    ]
    assert fold_keys(["a.1.b", "a.2.b"]) == [("a.{1,2}.b", 2)]
    assert fold_keys(["fc.weight", "fc.bias", "fc.weight"]) == [("fc.weight", 1), ("fc.bias", 1)]
    # Leading zeros are names, not indices: folding them would change the keys.
    assert fold_keys(["a.01", "a.1"]) == [("a.01", 1), ("a.1", 1)]


def test_parses_torchs_own_message():
    model = nn.Linear(3, 4)
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict({"weight": torch.zeros(5, 3), "bias": torch.zeros(4)})
    message = str(info.value).split("\n\t")[1]
    assert parse_size_mismatch(message) == Mismatch("weight", (5, 3), (4, 3))
    scalar = (
        "size mismatch for a: b.c: copying a param with shape torch.Size([]) from checkpoint, "
        "the shape in current model is torch.Size([1])."
    )
    assert parse_size_mismatch(scalar) == Mismatch("a: b.c", (), (1,))
    assert parse_size_mismatch("Unexpected running stats buffer(s)") is None


def _result(**kwargs) -> LoadResult:
    base = {
        "missing_keys": ["bn.num_batches_tracked", "head.weight"],
        "unexpected_keys": [f"layers.{i}.extra" for i in range(3)],
        "error_msgs": [
            "size mismatch for fc.weight: copying a param with shape torch.Size([10, 2]) from "
            "checkpoint, the shape in current model is torch.Size([5, 2]).",
            "custom loader said no",
        ],
        "num_source_keys": 9,
    }
    base.update(kwargs)
    return LoadResult.build(**base)


def test_flat_format_is_the_seeds():
    result = _result()
    assert format_report(result, "flat") == (
        "The model and loaded state dict do not match exactly\n\n"
        "size mismatch for fc.weight: copying a param with shape torch.Size([10, 2]) from "
        "checkpoint, the shape in current model is torch.Size([5, 2]).\n"
        "custom loader said no\n"
        "unexpected key in source state_dict: layers.0.extra, layers.1.extra, layers.2.extra\n\n"
        "missing keys in source state_dict: head.weight\n"
    )


def test_folded_format_sections():
    collision = Collision("a.w", ("module.a.w", "a.w"), "a.w")
    text = format_report(_result(collisions=[collision]))
    assert text.splitlines() == [
        "The model and loaded state dict do not match exactly (loaded 5 of 9 keys)",
        "unexpected key in source state_dict (3):",
        "    layers.{0..2}.extra  [3 keys]",
        "missing keys in source state_dict (1):",
        "    head.weight",
        "size mismatch, not loaded (1):",
        "    fc.weight: checkpoint (10, 2), model (5, 2)",
        "key collisions after revise_keys (1), one value kept each:",
        "    a.w <- module.a.w, a.w (kept a.w)",
        "other load errors (1):",
        "    custom loader said no",
    ]
    assert "key collisions after revise_keys: a.w <- module.a.w, a.w (kept a.w)" in (
        format_report(_result(collisions=[collision]), "flat")
    )


def test_mismatches_fold_by_shape():
    msgs = [
        f"size mismatch for layers.{i}.w: copying a param with shape torch.Size([{n}]) from "
        "checkpoint, the shape in current model is torch.Size([2])."
        for i, n in [(0, 3), (1, 3), (2, 3), (3, 4)]
    ]
    text = format_report(LoadResult.build([], [], msgs, num_source_keys=4))
    assert "    layers.{0..2}.w: checkpoint (3,), model (2,)  [3 keys]" in text.splitlines()
    assert "    layers.3.w: checkpoint (4,), model (2,)" in text.splitlines()
    assert text.startswith("loaded 0 of 4 keys: 0 match no key of the model and 4 have a")


def test_nothing_to_report():
    result = LoadResult.build(["bn.num_batches_tracked"], [], [], num_source_keys=3)
    assert result.ok and not result.nothing_loaded
    assert format_report(result) == format_report(result, "flat") == ""
    assert str(result) == "<All keys matched successfully (3 keys)>"


def test_nothing_loaded_leads_both_formats():
    result = LoadResult.build(["w"], ["module.w"], [], num_source_keys=1)
    assert result.nothing_loaded and result.num_loaded == 0
    assert format_report(result).startswith("loaded 0 of 1 keys")
    assert "loaded 0 of 1 keys" in format_report(result, "flat")


def test_unknown_style():
    with pytest.raises(ValueError, match="unknown report style"):
        format_report(_result(), "fancy")  # type: ignore[arg-type]


def test_log_message_targets(caplog):
    with caplog.at_level(logging.DEBUG):
        log_message("", None)
        log_message("quiet", "silent")
        log_message("a", None)
        log_message("b", "current", logging.INFO)
        log_message("c", "other.name")
        log_message("d", logging.LoggerAdapter(logging.getLogger("adapted"), {}))
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("ckptmap", logging.WARNING, "a"),
        ("ckptmap", logging.INFO, "b"),
        ("other.name", logging.WARNING, "c"),
        ("adapted", logging.WARNING, "d"),
    ]
