"""Hugging Face shards written by the real tools inside the tests: transformers' `save_pretrained`
(sharded safetensors, tied weights dropped) and huggingface_hub's `save_torch_model` with
``safe_serialization=False`` (sharded ``pytorch_model.bin`` with its index; transformers 5 writes
only safetensors). A tiny Llama built from its config, random weights: nothing is downloaded.
"""

from __future__ import annotations

import json
import os

# Before transformers / huggingface_hub read them at import: never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import shutil
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
import transformers
from torch import nn

import ckptmap
from ckptmap.errors import StateDictMismatchError
from ckptmap.formats import Format, sniff
from ckptmap.formats.sharded import ShardedCheckpoint

SHARD_SIZE = "20KB"


def tiny_config() -> Any:
    return transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )


def tiny_llama(seed: int) -> Any:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="module")
def source() -> Any:
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return tiny_llama(0)


@pytest.fixture(scope="module")
def safetensors_dir(source: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "safetensors"
    source.save_pretrained(directory, max_shard_size=SHARD_SIZE)
    return directory


@pytest.fixture(scope="module")
def bin_dir(source: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "bin"
    source.config.save_pretrained(directory)
    huggingface_hub.save_torch_model(
        source, directory, max_shard_size=SHARD_SIZE, safe_serialization=False
    )
    return directory


def assert_same_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert list(state) == list(expected)
    for name, value in state.items():
        assert value.dtype == expected[name].dtype, name
        assert torch.equal(value, expected[name]), name


def test_save_pretrained_wrote_safetensors_shards(safetensors_dir: Path, source: Any) -> None:
    index = json.loads((safetensors_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3
    assert all(sniff(safetensors_dir / s).format is Format.SAFETENSORS for s in shards)
    # save_pretrained drops the tied copy of the embedding.
    assert "lm_head.weight" not in index["weight_map"]
    assert sniff(safetensors_dir).format is Format.SHARDED


def test_safetensors_shards_load_into_the_same_model(safetensors_dir: Path, source: Any) -> None:
    model = tiny_llama(1)
    with pytest.raises(StateDictMismatchError) as info:
        ckptmap.load_checkpoint(model, safetensors_dir, strict=True)
    # Exactly what torch reports for the same weights, and the tie keeps lm_head right.
    assert info.value.missing == ["lm_head.weight"] and info.value.unexpected == []
    reference = tiny_llama(2)
    with ShardedCheckpoint(safetensors_dir) as sharded:
        result = reference.load_state_dict(sharded.load(), strict=False)
    assert result.missing_keys == ["lm_head.weight"] and result.unexpected_keys == []
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_same_state(model, source.state_dict())
    assert_same_state(reference, source.state_dict())


def test_safetensors_shards_match_from_pretrained(safetensors_dir: Path) -> None:
    theirs = transformers.LlamaForCausalLM.from_pretrained(safetensors_dir)
    ours = tiny_llama(3)
    ckptmap.load_checkpoint(ours, safetensors_dir)
    assert_same_state(ours, theirs.state_dict())


def test_bin_shards_load_and_match_from_pretrained(bin_dir: Path, source: Any) -> None:
    index = json.loads((bin_dir / "pytorch_model.bin.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3 and all(s.endswith(".bin") for s in shards)
    assert all(sniff(bin_dir / s).format is Format.TORCH_ZIP for s in shards)
    model = tiny_llama(4)
    # huggingface_hub keeps the tied weight in the index: nothing is missing.
    ckptmap.load_checkpoint(model, bin_dir, strict=True)
    assert_same_state(model, source.state_dict())
    theirs = transformers.LlamaForCausalLM.from_pretrained(bin_dir)
    assert_same_state(theirs, source.state_dict())


def test_a_repository_with_both_indexes_loads_the_safetensors(
    safetensors_dir: Path, bin_dir: Path, source: Any, tmp_path: Path
) -> None:
    both = tmp_path / "both"
    shutil.copytree(safetensors_dir, both)
    for item in bin_dir.iterdir():
        if item.name.startswith("pytorch_model"):
            shutil.copy(item, both / item.name)
    with ShardedCheckpoint(both) as sharded:
        assert sharded.index_path.endswith("model.safetensors.index.json")
    model = tiny_llama(5)
    ckptmap.load_checkpoint(model, both)
    assert_same_state(model, source.state_dict())


class Wrapped(nn.Module):
    """The same architecture one level down, as a detector wraps its backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = tiny_llama(6)


def test_revise_keys_into_a_wrapping_parent(safetensors_dir: Path, source: Any) -> None:
    model = Wrapped()
    with pytest.raises(StateDictMismatchError) as info:
        ckptmap.load_checkpoint(model, safetensors_dir, strict=True, revise_keys=[(r"^", "lm.")])
    assert info.value.missing == ["lm.lm_head.weight"] and info.value.unexpected == []
    assert_same_state(model.lm, source.state_dict())


class Block(nn.Module):
    """A decoder block of plain torch modules under other names."""

    def __init__(self, hidden: int, kv: int, inner: int) -> None:
        super().__init__()
        self.attn = nn.ModuleDict(
            {
                "q": nn.Linear(hidden, hidden, bias=False),
                "k": nn.Linear(hidden, kv, bias=False),
                "v": nn.Linear(hidden, kv, bias=False),
                "out": nn.Linear(hidden, hidden, bias=False),
            }
        )
        self.mlp = nn.ModuleDict(
            {
                "gate": nn.Linear(hidden, inner, bias=False),
                "up": nn.Linear(hidden, inner, bias=False),
                "down": nn.Linear(inner, hidden, bias=False),
            }
        )
        self.norm1 = nn.RMSNorm(hidden)
        self.norm2 = nn.RMSNorm(hidden)


class PlainDecoder(nn.Module):
    """A renamed copy of the tiny Llama built from torch modules only."""

    def __init__(self) -> None:
        super().__init__()
        cfg = tiny_config()
        kv = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(
            Block(cfg.hidden_size, kv, cfg.intermediate_size) for _ in range(cfg.num_hidden_layers)
        )
        self.final_norm = nn.RMSNorm(cfg.hidden_size)


RENAME = [
    (r"^model\.embed_tokens\.", "embed."),
    (r"^model\.norm\.", "final_norm."),
    (r"^model\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.", r"blocks.\1.attn.\2."),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"blocks.\1.attn.out."),
    (r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.", r"blocks.\1.mlp.\2."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"blocks.\1.norm1."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"blocks.\1.norm2."),
]


def _renamed(name: str) -> str:
    import re

    for pattern, repl in RENAME:
        name = re.sub(pattern, repl, name)
    return name


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_revise_keys_into_a_renamed_plain_torch_copy(
    layout: str, safetensors_dir: Path, bin_dir: Path, source: Any
) -> None:
    directory = safetensors_dir if layout == "safetensors" else bin_dir
    model = PlainDecoder()
    expected = {_renamed(k): v for k, v in source.state_dict().items() if k != "lm_head.weight"}
    if layout == "safetensors":
        ckptmap.load_checkpoint(model, directory, strict=True, revise_keys=RENAME)
    else:
        # The .bin index also has the tied lm_head, which the plain copy has no place for.
        with pytest.raises(StateDictMismatchError) as info:
            ckptmap.load_checkpoint(model, directory, strict=True, revise_keys=RENAME)
        assert info.value.unexpected == ["lm_head.weight"] and info.value.missing == []
    assert_same_state(model, {name: expected[name] for name in model.state_dict()})


def test_prefix_of_one_layer_loads_into_that_submodule(safetensors_dir: Path, source: Any) -> None:
    kept = ckptmap._load_checkpoint_with_prefix("model.layers.1", safetensors_dir)
    layer = source.model.layers[1].state_dict()
    assert sorted(kept) == sorted(layer)
    target = tiny_llama(7).model.layers[1]
    target.load_state_dict(kept, strict=True)
    assert_same_state(target, layer)
