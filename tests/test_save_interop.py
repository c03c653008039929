"""Files `save_checkpoint` writes are read by the other tools: transformers' `from_pretrained`
(one safetensors file, or shards plus ``model.safetensors.index.json``) and safetensors' own
reader see the weights; ckptmap's entries ride along in the metadata without disturbing them.
A tiny Llama from its config with random weights: nothing is downloaded.
"""

from __future__ import annotations

import os

# Before transformers / huggingface_hub read them at import: never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import ckptmap
from ckptmap.save import is_shard_file, save_checkpoint


@pytest.fixture(scope="module")
def llama():
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("max_shard_size", [None, "20KB"], ids=["one file", "shards"])
def test_transformers_loads_what_ckptmap_saves(llama, tmp_path, max_shard_size):
    llama.config.save_pretrained(tmp_path)
    checkpoint = {"meta": {"epoch": 3, "CLASSES": ("a", "b")}, "state_dict": llama.state_dict()}
    written = save_checkpoint(
        checkpoint, tmp_path / "model.safetensors", max_shard_size=max_shard_size
    )
    if max_shard_size is not None:
        assert written == str(tmp_path / "model.safetensors.index.json")
        shards = sorted(p for p in os.listdir(tmp_path) if is_shard_file(p))
        assert len(shards) > 1
        with safe_open(tmp_path / shards[0], "pt") as f:
            assert f.metadata() is None  # shards carry tensors only
    else:
        with safe_open(written, "pt") as f:
            assert f.metadata()["format"] == "pt"
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    theirs, ours = loaded.state_dict(), llama.state_dict()
    assert sorted(theirs) == sorted(ours)
    assert all(torch.equal(theirs[k], v) for k, v in ours.items())
    # ... and ckptmap reads the whole checkpoint back.
    again = ckptmap._load_checkpoint(Path(written), logger="silent")
    assert again["meta"] == {"epoch": 3, "CLASSES": ("a", "b")}
    assert list(again["state_dict"]) == list(ours)
