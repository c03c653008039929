"""Renamings of real architectures' state-dict keys, as other codebases name the same tensors.

Each renaming maps a torchvision key to the name another codebase (timm, OpenMMLab, a DDP
wrapper, ...) would give it; it is the ground truth of the tests of `ckptmap suggest`, which
must find the rules that undo it. They are written here by hand, independently of the
suggester, with `re.sub` and plain string functions.
"""

from __future__ import annotations

import re
from collections.abc import Callable

Renaming = Callable[[str], str]


def _sub_all(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


# --- ResNet-50 --------------------------------------------------------------------------------


def resnet_ddp(key: str) -> str:
    """A DistributedDataParallel checkpoint: every key under ``module.``."""
    return "module." + key


def resnet_bn_to_norm(key: str) -> str:
    """``bn1`` -> ``norm1`` everywhere (stem and blocks)."""
    return re.sub(r"(^|\.)bn(\d)\.", r"\1norm\2.", key)


def resnet_timm_stages(key: str) -> str:
    """A ``backbone.`` wrapper, ``layer1.0`` -> ``stages.0.blocks.0``, ``bn`` -> ``norm``,
    ``downsample.{0,1}`` -> ``shortcut.{conv,norm}``, a stem and a ``head.fc``."""
    key = re.sub(r"^layer(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.", key)
    key = re.sub(r"\.bn(\d)\.", r".norm\1.", key)
    key = re.sub(r"^conv1\.", "stem.conv.", key)
    key = re.sub(r"^bn1\.", "stem.norm.", key)
    key = key.replace(".downsample.0.", ".shortcut.conv.").replace(
        ".downsample.1.", ".shortcut.norm."
    )
    key = re.sub(r"^fc\.", "head.fc.", key)
    return "backbone." + key


def resnet_flat(key: str) -> str:
    """Flattened module paths: ``layer1.0.conv1`` -> ``layer1_0.conv1``, ``downsample.0`` ->
    ``downsample_conv``, ``downsample.1`` -> ``downsample_bn``, ``fc`` -> ``classifier``."""
    key = re.sub(r"^layer(\d)\.(\d+)\.", r"layer\1_\2.", key)
    key = key.replace(".downsample.0.", ".downsample_conv.").replace(
        ".downsample.1.", ".downsample_bn."
    )
    return re.sub(r"^fc\.", "classifier.", key)


def resnet_mm_stem(key: str) -> str:
    """An OpenMMLab-like layout: ``model.backbone.`` wrapper, the stem as ``stem.0`` / ``stem.1``,
    ``layerN`` -> ``res_layers.N-1`` and the classifier as ``head.fc``."""
    key = re.sub(r"^conv1\.", "stem.0.", key)
    key = re.sub(r"^bn1\.", "stem.1.", key)
    key = re.sub(r"^layer(\d)\.", lambda m: f"res_layers.{int(m[1]) - 1}.", key)
    if key.startswith("fc."):
        return "model.head." + key
    return "model.backbone." + key


# --- ViT-B/16 ---------------------------------------------------------------------------------


def vit_timm(key: str) -> str:
    """timm's ViT names: ``blocks.N.attn.qkv``, ``norm1``, ``mlp.fc1``, ``cls_token``, ..."""
    return _sub_all(
        key,
        [
            (r"^class_token$", "cls_token"),
            (r"^conv_proj\.", "patch_embed.proj."),
            (r"^encoder\.pos_embedding$", "pos_embed"),
            (r"^encoder\.layers\.encoder_layer_(\d+)\.", r"blocks.\1."),
            (r"\.ln_(\d)\.", r".norm\1."),
            (r"\.self_attention\.in_proj_", ".attn.qkv."),
            (r"\.self_attention\.out_proj\.", ".attn.proj."),
            (r"\.mlp\.0\.", ".mlp.fc1."),
            (r"\.mlp\.3\.", ".mlp.fc2."),
            (r"^encoder\.ln\.", "norm."),
            (r"^heads\.head\.", "head."),
        ],
    )


def vit_nested_ddp(key: str) -> str:
    """``module.model.`` wrappers and ``encoder_layer_N`` split into ``layers.N`` (an index
    nested instead of merged into a name), ``self_attention`` -> ``attn``."""
    key = re.sub(r"\.encoder_layer_(\d+)\.", r".\1.", key)
    key = key.replace(".self_attention.", ".attn.")
    return "module.model." + key


# --- Swin-T -----------------------------------------------------------------------------------


def swin_timm(key: str) -> str:
    """timm's Swin names under ``model.``: ``features.{1,3,5,7}.N`` -> ``layers.{0..3}.blocks.N``,
    ``features.{2,4,6}`` -> ``layers.{1..3}.downsample``, the patch embedding, ``mlp.fc1``."""

    def feature(m: re.Match[str]) -> str:
        index, rest = int(m[1]), m[2]
        if index == 0:
            return "patch_embed." + re.sub(r"^0\.", "proj.", re.sub(r"^2\.", "norm.", rest))
        if index % 2:
            return f"layers.{(index - 1) // 2}.blocks.{rest}"
        return f"layers.{index // 2}.downsample.{rest}"

    key = re.sub(r"^features\.(\d+)\.(.*)$", feature, key)
    key = key.replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.3.", ".mlp.fc2.")
    key = re.sub(r"^head\.", "head.fc.", key)
    return "model." + key


def swin_attention_names(key: str) -> str:
    """``features.N`` -> ``stages.N``, ``attn.qkv`` -> ``attention.in_proj``, ``attn.proj`` ->
    ``attention.out_proj``, ``norm1`` / ``norm2`` -> ``ln_1`` / ``ln_2``."""
    key = re.sub(r"^features\.", "stages.", key)
    key = key.replace(".attn.qkv.", ".attention.in_proj.").replace(
        ".attn.proj.", ".attention.out_proj."
    )
    key = key.replace(".attn.relative_position", ".attention.relative_position")
    return re.sub(r"\.norm(\d)\.", r".ln_\1.", key)


RESNET = {
    "resnet_ddp": resnet_ddp,
    "resnet_bn_to_norm": resnet_bn_to_norm,
    "resnet_timm_stages": resnet_timm_stages,
    "resnet_flat": resnet_flat,
    "resnet_mm_stem": resnet_mm_stem,
}
VIT = {"vit_timm": vit_timm, "vit_nested_ddp": vit_nested_ddp}
SWIN = {"swin_timm": swin_timm, "swin_attention_names": swin_attention_names}
