"""GPU check: ckptmap against torch, mmengine, safetensors, fastsafetensors and the Run:ai
model streamer, loading into CUDA models. One script, one run, under 5 minutes on one GPU.

    python benches/gpu_check.py            # on a machine with CUDA
    python benches/gpu_check.py --quick    # without torch's and mmengine's 49k-key loads (~70 s)
    python benches/gpu_check.py --smoke    # the same code on CPU at toy sizes (checks the script)

Without CUDA (and without --smoke) it says so and exits 0. It makes its own files in a
temporary directory and removes them. Rows (issue 12):

- 49,152-tensor MoE state dict (4 layers x 4096 experts x 3 Linear(4, 4)) in CPU memory into
  a CUDA model; the same with the state dict already on the GPU; into a CPU model. Floors:
  `torch._foreach_copy_` of the same pairs, one pinned host-to-device copy of all the bytes.
- A 2 GiB .safetensors file (64 x bf16 4096 x 4096 + 64 LayerNorms) into a CUDA model, page
  cache warm, then dropped (``posix_fadvise(POSIX_FADV_DONTNEED)`` on the file before each
  run: it drops the file's clean, unmapped pages; the script says when a read after it still
  looks cached). Floors: one pinned host-to-device copy of the same bytes; one sequential
  read of the file.
- The same weights as a 2 GiB .pth (``torch.save``) into a CUDA model, warm: the default load,
  and with ``map_location`` on the device (read through the staging ring; a note says when
  it was not).

Every time is the best of the rounds given, in ms, with the device synchronized before and
after; ckptmap's loads are checked to give the file's weights. Competitors that are not
installed, or fail, are listed as such instead of stopping the run.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import ckptmap
from ckptmap.module_load import load_state_dict

# --- models ---------------------------------------------------------------------------------


class Expert(nn.Module):
    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, d, bias=False)
        self.w2 = nn.Linear(d, d, bias=False)
        self.w3 = nn.Linear(d, d, bias=False)


class MoE(nn.Module):
    def __init__(self, layers: int, experts: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"experts": nn.ModuleList(Expert() for _ in range(experts))})
            for _ in range(layers)
        )


class Big(nn.Module):
    """`blocks` x (bf16 Linear(width, width), fp32 LayerNorm(width)): 2 GiB at 64 x 4096."""

    def __init__(self, blocks: int, width: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "proj": nn.Linear(width, width, bias=False, dtype=torch.bfloat16),
                    "norm": nn.LayerNorm(width),
                }
            )
            for _ in range(blocks)
        )


def build(make: Callable[[], nn.Module], device: str) -> nn.Module:
    with torch.device(device):
        return make()


# --- timing ---------------------------------------------------------------------------------


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_ms(fn: Callable[[], Any], rounds: int, before: Callable[[], Any] | None = None) -> float:
    times = []
    for _ in range(rounds):
        if before is not None:
            before()
        gc.collect()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


class Table:
    """Rows of (case, implementation, ms or a note); printed as one markdown table."""

    def __init__(self, budget_s: float) -> None:
        self.rows: list[tuple[str, str, float | None, str]] = []
        self.floors: dict[str, float] = {}
        self.deadline = time.perf_counter() + budget_s

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()

    def add(self, case: str, impl: str, fn: Callable[[], Any], rounds: int, **kw: Any) -> None:
        try:
            ms = best_ms(fn, rounds, **kw)
        except Exception as err:  # a competitor's failure is a result, not the end of the run
            self.rows.append((case, impl, None, f"failed: {type(err).__name__}: {err}"[:160]))
            print(f"  {impl}: failed ({type(err).__name__}: {err})", flush=True)
            return
        self.rows.append((case, impl, ms, ""))
        print(f"  {impl}: {ms:,.1f} ms", flush=True)

    def floor(self, case: str, impl: str, fn: Callable[[], Any], rounds: int, **kw: Any) -> None:
        self.add(case, f"floor: {impl}", fn, rounds, **kw)
        if self.rows[-1][2] is not None:
            self.floors.setdefault(case, self.rows[-1][2])

    def skip(self, case: str, impl: str, why: str) -> None:
        self.rows.append((case, impl, None, why))
        print(f"  {impl}: {why}", flush=True)

    def print(self) -> None:
        print("\n| case | implementation | ms | vs ckptmap | vs first floor | note |")
        print("|---|---|---:|---:|---:|---|")
        for case, impl, ms, note in self.rows:
            ours = next((m for c, i, m, _ in self.rows if c == case and i == "ckptmap" and m), None)
            floor = self.floors.get(case)
            cells = [
                case,
                impl,
                "" if ms is None else f"{ms:,.1f}",
                "" if ms is None or not ours else f"{ms / ours:.2f}x",
                "" if ms is None or not floor else f"{ms / floor:.1f}x",
                note,
            ]
            print("| " + " | ".join(cells) + " |")


# --- helpers --------------------------------------------------------------------------------


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def silent_logger() -> logging.Logger:
    logger = logging.getLogger("gpu_check.silent")
    logger.handlers[:] = [logging.NullHandler()]
    logger.propagate = False
    return logger


def torch_load_state_dict(model: nn.Module, sd: Any) -> None:
    model.load_state_dict(sd, strict=False)


def pinned_h2d(nbytes: int, device: str) -> Callable[[], None]:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return lambda: dev.copy_(host, non_blocking=True)


def drop_cache(path: str) -> None:
    """Asks the kernel to drop the file's pages (written back first: dirty ones stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sequential_read(path: str) -> Callable[[], None]:
    buffer = bytearray(64 << 20)

    def read() -> None:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass

    return read


def assert_loaded(model: nn.Module, expected: dict[str, torch.Tensor], what: str) -> None:
    for name, value in model.state_dict().items():
        if name in expected and not torch.equal(value.cpu(), expected[name].cpu()):
            raise AssertionError(f"{what}: {name} differs from the checkpoint")


def pth_unstreamed(load: Callable[[], Any]) -> str | None:
    """Runs `load` once; why ckptmap's .pth reader did not stream it to the device (its debug
    log), or None when it did. CPU targets stream only under a test engine: the smoke run
    says so."""

    class Catch(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.why: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if "not streamed to" in message:
                self.why.append(message.rsplit("(", 1)[-1].rstrip(")"))

    log = logging.getLogger("ckptmap")
    catch, level = Catch(), log.level
    log.addHandler(catch)
    log.setLevel(logging.DEBUG)
    try:
        load()
    finally:
        log.removeHandler(catch)
        log.setLevel(level)
    if catch.why:
        return catch.why[0]
    if not torch.cuda.is_available():
        return "no CUDA device (smoke run): CPU loads keep zero-copy views"
    return None


def reset(model: nn.Module) -> Callable[[], None]:
    def zero() -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()

    return zero


# --- the rows -------------------------------------------------------------------------------


def moe_rows(table: Table, device: str, layers: int, experts: int, slow: bool) -> None:
    torch.manual_seed(0)
    source = MoE(layers, experts)
    sd_cpu = OrderedDict((k, v + 1) for k, v in source.state_dict().items())
    for where in ("CPU", "GPU") if device == "cuda" else ("CPU",):
        sd = sd_cpu if where == "CPU" else OrderedDict((k, v.to(device)) for k, v in sd_cpu.items())
        moe_case(table, device, where, lambda: MoE(layers, experts), sd, sd_cpu, slow)
        gc.collect()
    if device == "cuda":
        moe_case(table, "cpu", "CPU", lambda: MoE(layers, experts), sd_cpu, sd_cpu, slow=False)


def moe_case(
    table: Table,
    device: str,
    where: str,
    make: Callable[[], nn.Module],
    sd: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    slow: bool,
) -> None:
    case = f"{len(sd):,}-tensor MoE state dict ({where}) into a {device.upper()} model"
    print(f"\n{case}", flush=True)
    model = build(make, device)
    table.add(case, "ckptmap", lambda: load_state_dict(model, sd, logger="silent"), 3)
    assert_loaded(model, expected, case)
    mm = _mmengine()
    if not slow:
        table.skip(case, "torch, mmengine", "left out (--quick)")
    elif table.time_left() < 60:
        table.skip(case, "torch, mmengine", "left out: the run would pass 5 minutes")
    else:
        table.add(case, "torch", lambda: torch_load_state_dict(model, sd), 1)
        if mm is None:
            table.skip(case, "mmengine", "not installed")
        else:
            logger = silent_logger()
            table.add(case, "mmengine", lambda: mm.load_state_dict(model, sd, logger=logger), 1)
    params = [model.get_parameter(k) for k in sd]
    values = list(sd.values())

    def foreach() -> None:
        with torch.no_grad():
            torch._foreach_copy_(params, values)

    table.floor(case, f"_foreach_copy_ {where} to {device.upper()}", foreach, 3)
    if where == "CPU" and device == "cuda":
        nbytes = sum(v.nbytes for v in sd.values())
        mib = f"{nbytes / 2**20:.1f} MiB"
        table.floor(case, f"one pinned copy of all {mib}", pinned_h2d(nbytes, device), 3)


def _mmengine() -> Any:
    try:
        import mmengine.runner.checkpoint as mm
    except Exception:
        return None
    return mm


def file_rows(table: Table, tmp: str, device: str, blocks: int, width: int, slow: bool) -> None:
    from safetensors.torch import load_file as st_load_file
    from safetensors.torch import load_model as st_load_model
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = build(lambda: Big(blocks, width), "cpu").state_dict()
    nbytes = sum(v.nbytes for v in weights.values())
    size = f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"
    st_path = os.path.join(tmp, "big.safetensors")
    pth_path = os.path.join(tmp, "big.pth")
    print(f"\nwriting {size} as .safetensors and .pth in {tmp}", flush=True)
    save_file(dict(weights), st_path)
    torch.save(weights, pth_path)
    model = build(lambda: Big(blocks, width), device)
    zero = reset(model)
    target = "cuda:0" if device == "cuda" else "cpu"

    def ckptmap_default(path: str) -> Callable[[], None]:
        return lambda: ckptmap.load_checkpoint(model, path, logger="silent")

    def ckptmap_streamed(path: str) -> Callable[[], None]:
        return lambda: ckptmap.load_checkpoint(model, path, map_location=target, logger="silent")

    def safetensors_to(dev: str) -> Callable[[], None]:
        return lambda: st_load_model(model, st_path, strict=False, device=dev)

    def fastsafetensors() -> None:
        from fastsafetensors import fastsafe_open

        with fastsafe_open(st_path, framework="pt", device=target, nogds=True) as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            model.load_state_dict(sd, strict=False)

    def runai() -> None:
        from runai_model_streamer import SafetensorsStreamer

        params = dict(model.state_dict())
        with SafetensorsStreamer() as streamer, torch.no_grad():
            streamer.stream_file(st_path)
            for name, tensor in streamer.get_tensors():
                params[name].copy_(tensor, non_blocking=True)

    for cold in (False, True):
        case = f"{size} .safetensors into a {device.upper()} model, page cache " + (
            "dropped" if cold else "warm"
        )
        print(f"\n{case}", flush=True)
        before = (lambda: (zero(), drop_cache(st_path))) if cold else zero
        rounds = 2 if cold else 3
        if not cold:
            st_load_file(st_path)  # warm the page cache
        table.add(case, "ckptmap", ckptmap_default(st_path), rounds, before=before)
        assert_loaded(model, weights, case)
        table.add(
            case,
            "ckptmap, map_location on the device",
            ckptmap_streamed(st_path),
            rounds,
            before=before,
        )
        assert_loaded(model, weights, case + " (map_location)")
        table.add(
            case, "safetensors load_model(device=cpu)", safetensors_to("cpu"), rounds, before=before
        )
        table.add(
            case,
            f"safetensors load_model(device={target})",
            safetensors_to(target),
            rounds,
            before=before,
        )
        for name, fn in (("fastsafetensors", fastsafetensors), ("runai-model-streamer", runai)):
            version = installed(name)
            if version is None:
                table.skip(case, name, "not installed")
            elif device != "cuda" and name == "fastsafetensors":
                table.skip(case, name, "needs CUDA")
            else:
                label = f"{name} {version}" + (" (no GDS)" if name == "fastsafetensors" else "")
                table.add(case, label, fn, rounds, before=before)
        if cold:
            table.floor(
                case,
                "one sequential read of the file",
                sequential_read(st_path),
                2,
                before=lambda: drop_cache(st_path),
            )
            if table.floors.get(case, 1e9) < nbytes / 8e9 * 1e3:  # faster than 8 GB/s
                table.skip(case, "note", "the read after the drop looks cached: drop had no effect")
        elif device == "cuda":
            table.floor(case, "one pinned host-to-device copy", pinned_h2d(nbytes, device), 3)

    case = f"{size} .pth into a {device.upper()} model, page cache warm"
    print(f"\n{case}", flush=True)
    torch.load(pth_path, mmap=True, weights_only=True)
    table.add(case, "ckptmap", ckptmap_default(pth_path), 3, before=zero)
    assert_loaded(model, weights, case)
    unstreamed = pth_unstreamed(lambda: ckptmap_streamed(pth_path)())
    table.add(
        case, "ckptmap, map_location on the device", ckptmap_streamed(pth_path), 3, before=zero
    )
    assert_loaded(model, weights, case + " (map_location)")
    if unstreamed:
        table.skip(case, "note", f"map_location load not streamed: {unstreamed}"[:160])
    table.add(
        case,
        "torch: load(mmap=True) + load_state_dict",
        lambda: model.load_state_dict(torch.load(pth_path, mmap=True, weights_only=True)),
        3,
        before=zero,
    )
    mm = _mmengine()
    if mm is None:
        table.skip(case, "mmengine", "not installed")
    elif slow:
        logger = silent_logger()
        table.add(
            case,
            "mmengine load_checkpoint",
            lambda: mm.load_checkpoint(model, pth_path, map_location="cpu", logger=logger),
            1,
            before=zero,
        )
    if device == "cuda":
        table.floor(case, "one pinned host-to-device copy", pinned_h2d(nbytes, device), 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="leave out the slow baselines")
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes: checks the script")
    args = parser.parse_args()
    if args.smoke:
        device, layers, experts, blocks, width = "cpu", 2, 64, 4, 256
    elif torch.cuda.is_available():
        device, layers, experts, blocks, width = "cuda", 4, 4096, 64, 4096
    else:
        print("gpu_check: no CUDA device on this machine; nothing to measure (see --smoke)")
        return 0
    started = time.perf_counter()
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none (smoke run)"
    print(
        f"gpu_check: {gpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch "
        f"{torch.__version__}, ckptmap {ckptmap.__version__}, safetensors "
        f"{installed('safetensors')}, mmengine {installed('mmengine-lite')}, "
        f"fastsafetensors {installed('fastsafetensors')}, runai-model-streamer "
        f"{installed('runai-model-streamer')}",
        flush=True,
    )
    table = Table(budget_s=270)
    tmp = tempfile.mkdtemp(prefix="ckptmap-gpu-check-")
    try:
        file_rows(table, tmp, device, blocks, width, slow=not args.quick)
        moe_rows(table, device, layers, experts, slow=not args.quick)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table.print()
    print(f"\n{time.perf_counter() - started:.0f} s in all; one run, best of the rounds.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
