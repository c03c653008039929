"""One rank of the FSDP tests in test_wrappers.py: a 2-process gloo group on CPU.

A module of its own so that spawned ranks import torch and ckptmap only, not the test module.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ckptmap

WORLD_SIZE = 2


class Net(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))


def fsdp_rank(rank: int, port: int, checkpoint: str, out_dir: str) -> None:
    import warnings

    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    report: dict[str, Any] = {}
    try:
        reference = torch.load(checkpoint, weights_only=True)["state_dict"]
        torch.manual_seed(1)
        fsdp1 = FullyShardedDataParallel(Net(), device_id=torch.device("cpu"))
        report["fsdp1_sharded"] = [n for n, _ in fsdp1.named_parameters()]
        ckptmap.load_checkpoint(fsdp1, checkpoint, strict=True)
        full = ckptmap.get_state_dict(fsdp1)
        report["fsdp1_keys"] = list(full)
        report["fsdp1_equal"] = all(torch.equal(full[k], v) for k, v in reference.items())
        torch.manual_seed(1)
        fsdp2 = Net()
        fully_shard(fsdp2[0])
        fully_shard(fsdp2)
        try:
            ckptmap.load_checkpoint(fsdp2, checkpoint)
        except ckptmap.UnsupportedModelError as err:
            report["fsdp2_error"] = [type(err).__name__, isinstance(err, TypeError), str(err)]
        ours = ckptmap.get_state_dict(fsdp2)
        torchs = fsdp2.state_dict()
        report["fsdp2_state_dict_as_torch"] = list(ours) == list(torchs) and all(
            type(ours[k]) is type(torchs[k]) for k in torchs
        )
        full2 = get_model_state_dict(fsdp2, options=StateDictOptions(full_state_dict=True))
        report["fsdp2_untouched"] = not all(
            torch.equal(full2[k].cpu(), v) for k, v in reference.items()
        )
    finally:
        Path(out_dir, f"{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()
