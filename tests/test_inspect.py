"""`ckptmap inspect`: header-only summaries, the prefix tree, and the JSON output."""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ckptmap.cli.summary import add_inspect_parser, format_inspect, inspect_checkpoint
from ckptmap.errors import CorruptCheckpointError, UnsafeCheckpointError


class Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)


class Model(torch.nn.Module):
    def __init__(self, layers: int = 6, width: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, width)
        self.layers = torch.nn.ModuleList(Block(width) for _ in range(layers))
        self.head = torch.nn.Linear(width, 3, dtype=torch.bfloat16)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))


def cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ckptmap")
    add_inspect_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def expected_totals(state_dict: dict[str, torch.Tensor]) -> tuple[int, int, dict[str, Any]]:
    dtypes: dict[str, dict[str, int]] = {}
    for t in state_dict.values():
        slot = dtypes.setdefault(str(t.dtype).removeprefix("torch."), {"count": 0, "bytes": 0})
        slot["count"] += 1
        slot["bytes"] += t.nbytes
    return len(state_dict), sum(t.nbytes for t in state_dict.values()), dtypes


def find(tree: dict[str, Any], *names: str) -> dict[str, Any]:
    node = tree
    for name in names:
        node = next(c for c in node["children"] if c["name"] == name)
    return node


def test_zip_summary_counts_bytes_dtypes_and_tree(tmp_path: Path) -> None:
    sd = Model().state_dict()
    path = tmp_path / "model.pth"
    torch.save(sd, path)
    summary = inspect_checkpoint(path)
    count, nbytes, dtypes = expected_totals(sd)
    assert summary["format"] == "torch-zip" and summary["header_only"] is True
    assert summary["tensor_count"] == count and summary["total_bytes"] == nbytes
    assert summary["dtypes"] == dtypes
    assert next(iter(summary["dtypes"])) == "float32"  # largest first
    assert summary["file_bytes"] == path.stat().st_size
    layers = find(summary["tree"], "layers")
    assert [c["name"] for c in layers["children"]] == ["0-5"]
    run = layers["children"][0]
    assert run["repeat"] == 6 and run["count"] == 6 * 4
    assert [c["name"] for c in run["children"]] == ["proj", "norm"]
    assert find(summary["tree"], "head", "weight")["bytes"] == 3 * 16 * 2  # bfloat16
    assert sum(c["count"] for c in summary["tree"]["children"]) == count
    json.dumps(summary)  # JSON-ready as is


def test_nested_checkpoint_lists_every_tensor_by_dotted_path(tmp_path: Path) -> None:
    model = Model(layers=2)
    optimizer = torch.optim.Adam(model.parameters())
    model.embed(torch.tensor([1])).sum().backward()
    optimizer.step()
    path = tmp_path / "epoch_1.pth"
    torch.save(
        {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "meta": {}},
        path,
    )
    summary = inspect_checkpoint(path, depth=2)
    top = {c["name"]: c for c in summary["tree"]["children"]}
    assert set(top) == {"state_dict", "optimizer"}
    assert top["state_dict"]["count"] == len(model.state_dict())
    assert find(summary["tree"], "optimizer", "state")["children"] == []  # cut at depth 2


def test_different_layers_are_not_merged(tmp_path: Path) -> None:
    sd = collections.OrderedDict()
    for i in range(4):
        sd[f"blocks.{i}.weight"] = torch.zeros(8 if i < 3 else 2)
    path = tmp_path / "m.pth"
    torch.save(sd, path)
    blocks = find(inspect_checkpoint(path)["tree"], "blocks")
    assert [(c["name"], c.get("repeat")) for c in blocks["children"]] == [("0-2", 3), ("3", None)]


def test_wide_nodes_are_capped(tmp_path: Path) -> None:
    sd = {f"head_{i}.weight": torch.zeros(1) for i in range(30)}
    path = tmp_path / "m.pth"
    torch.save(sd, path)
    summary = inspect_checkpoint(path, max_children=10)
    children = summary["tree"]["children"]
    assert len(children) == 10 and children[-1]["name"] == "(21 more)"
    assert sum(c["count"] for c in children) == 30


@given(
    st.lists(
        st.lists(st.sampled_from(["a", "b", "0", "1", "2", "10", "w"]), min_size=1, max_size=5),
        min_size=1,
        max_size=20,
        unique_by=lambda parts: ".".join(parts),
    ),
    st.integers(1, 5),
)
def test_tree_totals_are_consistent(names: list[list[str]], depth: int) -> None:
    from ckptmap.cli.summary import _cap_children, _prefix_tree

    keys = [".".join(parts) for parts in names]
    # A key can not also be a prefix of another in a real state dict; drop those.
    keys = [k for k in keys if not any(o.startswith(k + ".") for o in keys)]
    tree = _cap_children(_prefix_tree([(k, len(k)) for k in keys], depth), 4)
    assert tree["count"] == len(keys) and tree["bytes"] == sum(len(k) for k in keys)

    def check(node: dict[str, Any], level: int) -> None:
        assert level <= depth
        if node["children"]:
            assert sum(c["count"] for c in node["children"]) == node["count"]
            assert sum(c["bytes"] for c in node["children"]) == node["bytes"]
            assert len(node["children"]) <= 4
        for child in node["children"]:
            check(child, level + 1)

    check(tree, 0)


def test_legacy_checkpoint_is_read_in_full(tmp_path: Path) -> None:
    sd = Model(layers=1).state_dict()
    path = tmp_path / "old.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    summary = inspect_checkpoint(path)
    assert summary["format"] == "torch-legacy" and summary["header_only"] is False
    assert summary["tensor_count"] == len(sd)
    assert "read in full" in format_inspect(summary)


def test_safetensors_summary_from_the_header(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in Model(layers=3).state_dict().items()}
    path = tmp_path / "model.bin"  # the content decides, not the name
    save_file(sd, str(path), metadata={"format": "pt"})
    summary = inspect_checkpoint(path)
    count, nbytes, dtypes = expected_totals(sd)
    assert summary["format"] == "safetensors" and summary["header_only"] is True
    assert (summary["tensor_count"], summary["total_bytes"], summary["dtypes"]) == (
        count,
        nbytes,
        dtypes,
    )
    assert summary["metadata"] == {"format": "pt"}
    # safetensors sorts names ("layers.10" before "layers.2"): alike layers still merge.
    assert [c["name"] for c in find(summary["tree"], "layers")["children"]] == ["0-2"]


def test_sharded_summary(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in Model(layers=2).state_dict().items()}
    names = list(sd)
    half = len(names) // 2
    shards = {"model-1.safetensors": names[:half], "model-2.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(tmp_path / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    summary = inspect_checkpoint(tmp_path)
    count, nbytes, dtypes = expected_totals(sd)
    assert summary["format"] == "sharded" and summary["shards"] == 2
    assert (summary["tensor_count"], summary["total_bytes"], summary["dtypes"]) == (
        count,
        nbytes,
        dtypes,
    )


def test_cli_json_and_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model.pth"
    torch.save(Model().state_dict(), path)
    args = cli(["inspect", str(path), "--json", "--depth", "2"])
    assert args.run(args) == 0
    assert json.loads(capsys.readouterr().out) == inspect_checkpoint(path, depth=2)
    args = cli(["inspect", str(path)])
    assert args.run(args) == 0
    text = capsys.readouterr().out
    assert "tensors: 28" in text and "[0-5] x6" in text and "bfloat16" in text


def test_cli_allow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    path = tmp_path / "epoch_1.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": {"seed": np.int64(1)}}, path)
    args = cli(["inspect", str(path), "--json"])  # numpy values need no opt-in
    assert args.run(args) == 0
    assert json.loads(capsys.readouterr().out)["tensor_count"] == 1
    path = tmp_path / "epoch_2.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1)}, path)
    args = cli(["inspect", str(path)])
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace"):
        args.run(args)
    args = cli(["inspect", str(path), "--allow", "argparse.Namespace", "--json"])
    assert args.run(args) == 0
    assert json.loads(capsys.readouterr().out)["tensor_count"] == 1


def test_bad_files_raise_the_loader_errors(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    path.write_text("<!doctype html><html>Not Found</html>")
    with pytest.raises(CorruptCheckpointError, match="HTML"):
        inspect_checkpoint(path)


def test_digit_like_names_that_are_not_numbers_are_not_merged() -> None:
    from ckptmap.cli.summary import _prefix_tree

    # "²".isdigit() is True, but it is no number: such siblings stay as they are.
    rows = [("a.\u00b2.w", 4), ("a.\u00b3.w", 4), ("a.1.w", 4), ("a.2.w", 4)]
    (a,) = _prefix_tree(rows, 3)["children"]
    assert [c["name"] for c in a["children"]] == ["\u00b2", "\u00b3", "1-2"]
    assert a["children"][2]["repeat"] == 2 and a["children"][2]["bytes"] == 8
