"""torch.distributed.checkpoint (DCP) directories, written by DCP itself inside the tests.

Producers: ``dcp.save`` in one process (no process group), and two real gloo processes that
save an FSDP2 (``fully_shard``) model, its optimizer and a column-split (tensor-parallel
style) DTensor, so tensors are split across both ranks' files. References: the model's own
state dict, torch's ``dcp.load`` and ``dcp_to_torch_save``.
"""

from __future__ import annotations

import collections
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ckptmap
from ckptmap.errors import (
    CheckpointIsADirectoryError,
    CkptmapError,
    CorruptCheckpointError,
    InvalidDcpCheckpointError,
    ShardNotFoundError,
    TensorNotFoundError,
    UnsafeCheckpointError,
    UnsafeDcpPathError,
    UnsafeDcpPickleError,
    UnsupportedDcpFeatureError,
)
from ckptmap.formats import Format, load_file, sniff
from ckptmap.formats.dcp import DcpCheckpoint, DcpTree, open_dcp, read_metadata

# --- producers --------------------------------------------------------------------------------


def quiet_save(state: dict[str, Any], directory: Path) -> Path:
    """``dcp.save`` in this process; DCP warns that it saves without a process group."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(directory))
    return directory


def quiet_load(state: dict[str, Any], directory: Path) -> None:
    """torch's own ``dcp.load`` in place, single process (the reference reader)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(directory))


class Net(nn.Module):
    """A small backbone (conv + BatchNorm) and a large head: prefix loads read little."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)
        )
        self.head = nn.Linear(1024, 1024)
        self.register_buffer("half_scale", torch.randn(5).to(torch.bfloat16))
        self.register_buffer("mask", torch.tensor([True, False, True]))


def build_net(seed: int) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        net.backbone[1].running_mean.normal_()
        net.backbone[1].num_batches_tracked.fill_(7)
    return net


@pytest.fixture(scope="module")
def flat(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """``dcp.save(model.state_dict())``: the common single-process case."""
    directory = tmp_path_factory.mktemp("dcp") / "flat"
    source = build_net(0).state_dict()
    quiet_save(source, directory)
    return directory, {k: v.clone() for k, v in source.items()}


@pytest.fixture(scope="module")
def nested(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training state: model, Adam state after one step, a step count, a tuple, odd tensors."""
    directory = tmp_path_factory.mktemp("dcp") / "nested"
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    optim = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optim.step()
    state = {
        "model": model.state_dict(),
        "optim": optim.state_dict(),
        "step": 5,
        "extra": {
            "tags": ("a", "b"),
            "empty": torch.zeros(0, 3),
            "scalar": torch.tensor(2.5, dtype=torch.float64),
        },
    }
    return quiet_save(state, directory)


# One rank of the distributed producer (a fresh interpreter each): an FSDP2 (fully_shard) model
# with odd sizes (5 rows split 3 + 2, 3 rows 2 + 1), its Adam state after one step, and a
# column-split DTensor as tensor parallelism makes, saved by DCP from both ranks.
_RANK_SCRIPT = """
import sys
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
try:
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    torch.manual_seed(3)
    column = torch.randn(4, 7)
    if rank == 0:
        torch.save({"model": model.state_dict(), "tp": {"weight": column}}, out + ".reference.pt")
    fully_shard(model, mesh=mesh)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 6)).sum().backward()
    optim.step()
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optim),
        "tp": {"weight": distribute_tensor(column, mesh, [Shard(1)])},
        "step": 3,
    }
    dcp.save(state, checkpoint_id=out)
finally:
    dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def ranked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A DCP directory written by two gloo processes; the unsharded reference."""
    root = tmp_path_factory.mktemp("dcp-ranks")
    out, store = root / "ckpt", root / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_SCRIPT, str(rank), str(store), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    for rank, (p, text) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed:\n{text[-4000:]}"
    reference = torch.load(str(out) + ".reference.pt", weights_only=True)
    return out, reference


def materialize(value: Any) -> Any:
    """Turns lazy trees into plain dicts (and lists' items) for comparison."""
    if isinstance(value, Mapping):
        return {k: materialize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [materialize(v) for v in value]
    return value


def assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def torch_reference(directory: Path, tmp_path: Path) -> Any:
    """torch's own reading of a DCP directory into one ``torch.save`` file (trusted input)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp_path / "reference.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp_to_torch_save(str(directory), str(target))
    return torch.load(target, weights_only=False)


def copy_dir(directory: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(directory, target)
    return target


def rewrite_metadata(directory: Path, change: Any) -> Any:
    """Unpickles our own trusted .metadata, lets `change` edit it, and writes it back."""
    path = directory / ".metadata"
    meta = pickle.loads(path.read_bytes())
    change(meta)
    path.write_bytes(pickle.dumps(meta))
    return meta


def storage_key(meta: Any, fqn: str, nth: int = 0) -> Any:
    return [k for k in meta.storage_data if k.fqn == fqn][nth]


# --- format detection and the plan ----------------------------------------------------------------


def test_sniffed_as_dcp(flat: tuple[Path, Any]) -> None:
    directory, _ = flat
    for path in (directory, directory / ".metadata"):
        sniffed = sniff(path)
        assert sniffed.format is Format.DCP
        assert sniffed.path == str(directory)
        assert sniffed.index_path == str(directory / ".metadata")
    assert isinstance(load_file(directory), DcpTree)


def test_the_plan_comes_from_metadata_alone(flat: tuple[Path, Any], tmp_path: Path) -> None:
    directory, source = flat
    copy = copy_dir(directory, tmp_path)
    # No data byte is needed to plan: the data files may be garbage of the same size.
    for data in copy.glob("*.distcp"):
        data.write_bytes(b"\0" * data.stat().st_size)
    with open_dcp(copy) as ckpt:
        assert ckpt.names == list(source)
        assert ckpt.shapes == [tuple(t.shape) for t in source.values()]
        assert ckpt.dtypes == [str(t.dtype).removeprefix("torch.") for t in source.values()]
        assert ckpt.sizes == [t.nbytes for t in source.values()]
        info = ckpt.info("head.weight")
        assert info.nbytes == 1024 * 1024 * 4 and len(info.chunks) == 1
        assert info.chunks[0].nbytes >= info.nbytes
        assert ckpt.objects == []
        with pytest.raises(InvalidDcpCheckpointError, match=r"not a torch\.save archive"):
            ckpt["head.weight"]


# --- loading ----------------------------------------------------------------------------------


def test_load_checkpoint_equals_the_source_and_torch(flat: tuple[Path, Any]) -> None:
    directory, source = flat
    model = build_net(99)
    ckptmap.load_checkpoint(model, directory, strict=True)
    theirs = build_net(98)
    reference = theirs.state_dict()
    quiet_load(reference, directory)
    for name, value in model.state_dict().items():
        assert_same(value, source[name], name)
        assert_same(value, reference[name], name)


def test_load_file_maps_names_to_tensors(flat: tuple[Path, Any]) -> None:
    directory, source = flat
    tree = load_file(directory)
    assert list(tree) == list(source) and len(tree) == len(source)
    assert tree.tensor_info("head.bias").shape == (1024,)
    assert_same(materialize(tree), source)
    ckpt = DcpCheckpoint(directory)
    assert_same(
        dict(ckpt.load(prefix="backbone")),
        {k: v for k, v in source.items() if k.startswith("backbone.")},
    )
    with pytest.raises(TensorNotFoundError, match="nope"):
        ckpt["nope"]


@pytest.mark.parametrize(
    "map_location",
    ["cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda storage, location: storage],
    ids=["str", "device", "dict", "callable"],
)
def test_map_location(flat: tuple[Path, Any], map_location: Any) -> None:
    directory, source = flat
    tree = load_file(directory, map_location)
    assert_same(tree["head.bias"], source["head.bias"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_map_location_to_gpu(flat: tuple[Path, Any]) -> None:
    directory, source = flat
    tensor = load_file(directory, "cuda")["backbone.0.weight"]
    assert tensor.device.type == "cuda"
    assert torch.equal(tensor.cpu(), source["backbone.0.weight"])


def test_prefix_load_reads_only_its_byte_ranges(
    flat: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, source = flat
    ckpt = DcpCheckpoint(directory)
    wanted = [n for n in ckpt.names if n.startswith("backbone.")]
    planned = ckpt.byte_ranges(wanted)
    planned_bytes = sum(end - start for spans in planned.values() for start, end in spans)
    total = sum(os.path.getsize(p) for p in ckpt.files.values())
    assert planned_bytes * 50 < total  # the head is most of the data

    ckptmap._load_checkpoint_with_prefix("backbone", directory)  # warm: imports, caches
    reads: list[tuple[str, int, int]] = []
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        data = real_pread(fd, n, offset)
        reads.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset, len(data)))
        return data

    monkeypatch.setattr(os, "pread", pread)
    before = _rchar()
    kept = ckptmap._load_checkpoint_with_prefix("backbone", directory)
    read_by_process = _rchar() - before
    monkeypatch.undo()

    assert_same(dict(kept), {k[len("backbone.") :]: v for k, v in source.items() if k in wanted})
    assert reads, "no data was read through pread"
    for file, offset, length in reads:
        assert any(s <= offset and offset + length <= e for s, e in planned[file]), (
            f"read {file}[{offset}:{offset + length}] lies outside the planned ranges"
        )
    data_read = sum(length for _f, _o, length in reads)
    # torch's zip reader re-reads a few small records (headers, the central directory).
    assert planned_bytes <= data_read <= planned_bytes + 16 * 1024 * len(wanted)
    if read_by_process is not None:
        metadata = (directory / ".metadata").stat().st_size
        # Everything the process read (the kernel's count): metadata, the ranges, a margin.
        assert read_by_process <= metadata + data_read + 256 * 1024
        assert read_by_process * 10 < total


def _rchar() -> int | None:
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except OSError:
        return None


def test_nested_state_equals_torchs_own_reading(nested: Path, tmp_path: Path) -> None:
    reference = torch_reference(nested, tmp_path)
    tree = load_file(nested)
    assert set(tree) == {"model", "optim", "step", "extra"}
    assert isinstance(tree["optim"]["param_groups"], list)
    assert_same(materialize(tree), reference)


def test_nested_model_loads_through_its_model_entry(nested: Path) -> None:
    torch.manual_seed(1)
    source = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    ckptmap.load_checkpoint(model, nested, strict=True)
    # One Adam step moved the saved weights away from the initial ones: compare with DCP.
    reference = {k: torch.empty_like(v) for k, v in source.state_dict().items()}
    quiet_load({"model": reference}, nested)
    assert_same(dict(model.state_dict()), reference)
    kept = ckptmap._load_checkpoint_with_prefix("0", nested)
    assert set(kept) == {"weight", "bias"}


def test_object_entries_load_safely_and_on_demand(nested: Path) -> None:
    ckpt = DcpCheckpoint(nested)
    assert "step" in ckpt.objects and "step" not in ckpt
    assert ckpt.load_object("step") == 5
    with pytest.raises(TensorNotFoundError, match="load_object"):
        ckpt["step"]
    with pytest.raises(TensorNotFoundError):
        ckpt.load_object("model.0.weight")


# --- two ranks, tensors split across files ---------------------------------------------------


def test_two_rank_save_reassembles_every_tensor(
    ranked: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    directory, reference = ranked
    ckpt = DcpCheckpoint(directory)
    assert set(ckpt.files) == {"__0_0.distcp", "__1_0.distcp"}
    split = ckpt.info("model.0.weight")
    assert [(c.offsets, c.sizes, c.file) for c in split.chunks] == [
        ((0, 0), (3, 6), "__0_0.distcp"),
        ((3, 0), (2, 6), "__1_0.distcp"),
    ]
    columns = ckpt.info("tp.weight")
    assert sorted(c.offsets for c in columns.chunks) == [(0, 0), (0, 4)]
    assert_same(ckpt["tp.weight"], reference["tp"]["weight"])
    assert_same(materialize(load_file(directory)), torch_reference(directory, tmp_path))


def test_two_rank_save_loads_into_an_unsharded_model(ranked: tuple[Path, dict[str, Any]]) -> None:
    directory, reference = ranked
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    ckptmap.load_checkpoint(model, directory, strict=True)
    # The saved weights are after one Adam step; torch's own reader is the reference.
    expected = {k: torch.empty_like(v) for k, v in reference["model"].items()}
    quiet_load({"model": expected}, directory)
    assert_same(dict(model.state_dict()), expected)
    assert not torch.equal(model[0].weight, reference["model"]["0.weight"])


def test_two_rank_prefix_reads_one_file(
    ranked: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory, _ = ranked
    ckpt = DcpCheckpoint(directory)
    only_rank1 = [
        n for n in ckpt.names if {c.file for c in ckpt.info(n).chunks} == {"__1_0.distcp"}
    ]
    assert only_rank1
    opened: list[str] = []
    real_open = os.open

    def spy(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(os.path.basename(os.fspath(path)))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    ckpt.load(only_rank1)
    assert set(opened) == {"__1_0.distcp"}


# --- safety: metadata and object entries never run code ---------------------------------------


class Payload:
    """Creates `sentinel` when unpickled by an unrestricted unpickler."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.sentinel}",))


def test_malicious_metadata_never_runs(flat: tuple[Path, Any], tmp_path: Path) -> None:
    directory = copy_dir(flat[0], tmp_path)
    sentinel = tmp_path / "pwned"

    def poison(meta: Any) -> None:
        meta.planner_data = Payload(sentinel)

    rewrite_metadata(directory, poison)
    for attempt in (
        lambda: load_file(directory),
        lambda: ckptmap.load_checkpoint(build_net(0), directory),
        lambda: read_metadata(directory),
    ):
        with pytest.raises(UnsafeDcpPickleError) as info:
            attempt()
        assert isinstance(info.value, UnsafeCheckpointError)
        assert "system" in str(info.value) and str(directory) in str(info.value)
        assert info.value.dangerous and info.value.entry == ".metadata"
    assert not sentinel.exists()


def test_a_payload_hidden_from_the_scan_still_cannot_run(
    flat: tuple[Path, Any], tmp_path: Path
) -> None:
    # STACK_GLOBAL with names built at load time slips past the opcode scan; the
    # unpickler's own find_class still refuses it.
    directory = copy_dir(flat[0], tmp_path)
    sentinel = tmp_path / "pwned"
    payload = (
        b"\x80\x04"
        + b"\x8c\x02os\x94"  # SHORT_BINUNICODE "os", MEMOIZE
        + b"\x8c\x06system\x94"
        + b"h\x00h\x01\x93"  # BINGET 0, BINGET 1, STACK_GLOBAL
        + b"\x8c"
        + bytes([len(f"touch {sentinel}")])
        + f"touch {sentinel}".encode()
        + b"\x85R."  # TUPLE1, REDUCE, STOP
    )
    (directory / ".metadata").write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError):
        load_file(directory)
    assert not sentinel.exists()


class Config:
    """A non-allowlisted class stored as a DCP object entry."""

    def __init__(self, depth: int) -> None:
        self.depth = depth


def test_object_entries_need_an_explicit_allowlist(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    directory = quiet_save(
        {"w": torch.ones(2), "config": Config(3), "evil": Payload(sentinel)}, tmp_path / "objs"
    )
    tree = load_file(directory)
    assert torch.equal(tree["w"], torch.ones(2))
    with pytest.raises(UnsafeDcpPickleError, match="Config") as info:
        tree["config"]
    assert info.value.entry == "config" and str(directory) in str(info.value)
    # The advice names the one opt-in there is.
    assert "allowed_globals" in str(info.value) and "weights_only" not in str(info.value)
    with pytest.raises(UnsafeCheckpointError) as info:
        tree["evil"]
    assert info.value.dangerous
    assert not sentinel.exists()
    allowed = load_file(directory, allowed_globals=[Config])
    assert allowed["config"].depth == 3
    # weights_only=False is refused for object entries: they are only read safely.
    unsafe = load_file(directory, weights_only=False)
    assert torch.equal(unsafe["w"], torch.ones(2))
    with pytest.raises(UnsupportedDcpFeatureError, match="safe unpickler"):
        unsafe["config"]
    assert not sentinel.exists()


# --- validation: every offset checked, typed errors naming the directory -----------------------


def _first_tensor(meta: Any) -> str:
    return next(iter(meta.state_dict_metadata))


def _nested_list(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


TAMPERING = {
    "parent-dir": (
        lambda m: setattr(
            m.storage_data[storage_key(m, "head.weight")], "relative_path", "../x.distcp"
        ),
        UnsafeDcpPathError,
        "'..' path component",
    ),
    "absolute": (
        lambda m: setattr(
            m.storage_data[storage_key(m, "head.weight")], "relative_path", "/etc/passwd"
        ),
        UnsafeDcpPathError,
        "absolute path",
    ),
    "missing-file": (
        lambda m: setattr(
            m.storage_data[storage_key(m, "head.weight")], "relative_path", "__7_0.distcp"
        ),
        ShardNotFoundError,
        "__7_0.distcp",
    ),
    "past-the-end": (
        lambda m: setattr(m.storage_data[storage_key(m, "head.weight")], "offset", 10**9),
        InvalidDcpCheckpointError,
        "truncated or mismatched",
    ),
    "negative-offset": (
        lambda m: setattr(m.storage_data[storage_key(m, "head.weight")], "offset", -1),
        InvalidDcpCheckpointError,
        "byte range",
    ),
    "overlap": (
        lambda m: setattr(
            m.storage_data[storage_key(m, "head.bias")],
            "offset",
            m.storage_data[storage_key(m, "head.weight")].offset + 8,
        ),
        InvalidDcpCheckpointError,
        "overlap",
    ),
    "too-short": (
        lambda m: setattr(m.storage_data[storage_key(m, "head.weight")], "length", 100),
        InvalidDcpCheckpointError,
        "fewer than the",
    ),
    "shape-bigger-than-chunks": (
        lambda m: setattr(m.state_dict_metadata["head.bias"], "size", torch.Size([2048])),
        InvalidDcpCheckpointError,
        "elements",
    ),
    "chunk-outside-shape": (
        lambda m: setattr(
            m.state_dict_metadata["head.bias"].chunks[0], "sizes", torch.Size([4096])
        ),
        InvalidDcpCheckpointError,
        "outside its shape",
    ),
    "no-chunks": (
        lambda m: setattr(m.state_dict_metadata["head.bias"], "chunks", []),
        InvalidDcpCheckpointError,
        "no chunks",
    ),
    "no-storage-record": (
        lambda m: m.storage_data.pop(storage_key(m, "head.bias")),
        InvalidDcpCheckpointError,
        "no storage record",
    ),
    "transforms": (
        lambda m: setattr(
            m.storage_data[storage_key(m, "head.bias")], "transform_descriptors", ["zstd"]
        ),
        UnsupportedDcpFeatureError,
        "zstd",
    ),
    "not-metadata": (
        lambda m: setattr(m, "state_dict_metadata", ["head.bias"]),
        InvalidDcpCheckpointError,
        "state_dict_metadata",
    ),
    "bad-path": (
        lambda m: m.planner_data.__setitem__("head.bias", ("head", 10**9)),
        InvalidDcpCheckpointError,
        "nested path",
    ),
    "deep-path": (
        lambda m: m.planner_data.__setitem__("head.bias", ("head", _nested_list(400))),
        InvalidDcpCheckpointError,
        "nested path",
    ),
    "colliding-paths": (
        lambda m: m.planner_data.__setitem__("head.bias", ("head.weight",)),
        InvalidDcpCheckpointError,
        "collides",
    ),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_metadata_is_refused(flat: tuple[Path, Any], tmp_path: Path, case: str) -> None:
    change, error, words = TAMPERING[case]
    directory = copy_dir(flat[0], tmp_path)
    rewrite_metadata(directory, change)
    with pytest.raises(error, match=words) as info:
        materialize(load_file(directory))
    assert isinstance(info.value, CkptmapError)
    assert str(directory) in str(info.value)


def test_symlinked_data_file_outside_the_directory(flat: tuple[Path, Any], tmp_path: Path) -> None:
    directory = copy_dir(flat[0], tmp_path)
    outside = tmp_path / "outside.distcp"
    (directory / "__0_0.distcp").rename(outside)
    (directory / "__0_0.distcp").symlink_to(outside)
    with pytest.raises(UnsafeDcpPathError, match="outside the directory"):
        load_file(directory)


def test_chunk_of_another_shape_is_caught_on_read(flat: tuple[Path, Any], tmp_path: Path) -> None:
    # backbone.3.bias's record points at head.bias's archive (head.bias removed): a real
    # float32 archive, large enough, of another shape. Only the read can tell.
    directory = copy_dir(flat[0], tmp_path)

    def repoint(meta: Any) -> None:
        meta.storage_data[storage_key(meta, "backbone.3.bias")] = meta.storage_data.pop(
            storage_key(meta, "head.bias")
        )
        del meta.state_dict_metadata["head.bias"]

    rewrite_metadata(directory, repoint)
    tree = load_file(directory)
    with pytest.raises(InvalidDcpCheckpointError, match=r"shape \[1024\], not \[4\]") as info:
        tree["backbone.3.bias"]
    assert str(directory) in str(info.value)


def test_chunk_of_another_dtype_is_caught_on_read(flat: tuple[Path, Any], tmp_path: Path) -> None:
    directory = copy_dir(flat[0], tmp_path)
    rewrite_metadata(
        directory,
        lambda m: setattr(m.state_dict_metadata["half_scale"].properties, "dtype", torch.float32),
    )
    with pytest.raises(InvalidDcpCheckpointError, match="holds a bfloat16 tensor, not the float32"):
        load_file(directory)["half_scale"]


def test_truncated_data_file(flat: tuple[Path, Any], tmp_path: Path) -> None:
    directory = copy_dir(flat[0], tmp_path)
    data = directory / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(InvalidDcpCheckpointError, match="truncated"):
        load_file(directory)


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"", CorruptCheckpointError),
        (b"not a pickle", CorruptCheckpointError),
        (pickle.dumps({"a": 1})[:-3], InvalidDcpCheckpointError),
        (pickle.dumps({"a": 1}), InvalidDcpCheckpointError),
    ],
    ids=["empty", "text", "truncated", "wrong-object"],
)
def test_bad_metadata_file(
    flat: tuple[Path, Any], tmp_path: Path, content: bytes, error: type[Exception]
) -> None:
    directory = copy_dir(flat[0], tmp_path)
    (directory / ".metadata").write_bytes(content)
    with pytest.raises(error) as info:
        ckptmap.load_checkpoint(build_net(0), directory)
    assert str(directory) in str(info.value)


def test_directory_without_metadata(tmp_path: Path) -> None:
    (tmp_path / "__0_0.distcp").write_bytes(b"PK")
    with pytest.raises(CheckpointIsADirectoryError):
        load_file(tmp_path)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_damaged_metadata_bytes_give_typed_errors(
    flat: tuple[Path, Any], tmp_path: Path, data: st.DataObject
) -> None:
    directory = tmp_path / "fuzzed"
    if not directory.exists():
        shutil.copytree(flat[0], directory)
    original = (flat[0] / ".metadata").read_bytes()
    raw = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    (directory / ".metadata").write_bytes(bytes(raw))
    try:
        tree = load_file(directory)
        for _ in _walk(tree):
            pass
    except CkptmapError:
        pass


@pytest.mark.parametrize("slot", [0x7FFFFFFF, 1 << 26])
def test_a_memo_slot_past_the_pickle_is_refused_before_unpickling(
    flat: tuple[Path, Any], tmp_path: Path, slot: int
) -> None:
    """Found by the fuzz test above: a damaged byte became LONG_BINPUT with a slot near
    2**31, and the C unpickler sized its memo to it (16 GiB: MemoryError here, a swapping
    machine elsewhere)."""
    directory = tmp_path / "memo"
    shutil.copytree(flat[0], directory)
    # An empty dict, memoized at `slot`.
    (directory / ".metadata").write_bytes(b"\x80\x02}r" + slot.to_bytes(4, "little") + b".")
    with pytest.raises(InvalidDcpCheckpointError, match="memo slot"):
        load_file(directory)


def _walk(value: Any) -> Iterator[Any]:
    if isinstance(value, Mapping):
        for v in value.values():
            yield from _walk(v)
    else:
        yield value


def test_reading_needs_no_unrestricted_pickle(
    flat: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # pickle.load / pickle.loads (what torch's own DCP reader uses) are never called.
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unrestricted unpickling")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    directory, source = flat
    assert_same(materialize(load_file(directory)), source)
    assert read_metadata(directory) is not None


# --- the command line and re-saving -------------------------------------------------------------


def test_inspect_reads_only_the_metadata(
    nested: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ckptmap.cli import main
    from ckptmap.cli.summary import inspect_checkpoint

    copy = copy_dir(nested, tmp_path)
    for data in copy.glob("*.distcp"):  # no data byte is needed
        data.write_bytes(b"\0" * data.stat().st_size)
    summary = inspect_checkpoint(copy)
    ckpt = DcpCheckpoint(nested)
    assert summary["format"] == "dcp" and summary["header_only"]
    assert summary["tensor_count"] == len(ckpt.names)
    assert summary["total_bytes"] == sum(ckpt.sizes)
    assert summary["shards"] == 1
    assert main(["inspect", str(copy)]) == 0
    assert f"tensors: {len(ckpt.names)}" in capsys.readouterr().out


def test_diff_against_a_model_reads_only_the_metadata(nested: Path, tmp_path: Path) -> None:
    from ckptmap.shapes import checkpoint_shapes

    copy = copy_dir(nested, tmp_path)
    for data in copy.glob("*.distcp"):
        data.write_bytes(b"\0" * data.stat().st_size)
    shapes, fmt, header_only = checkpoint_shapes(copy)
    assert fmt == "dcp" and header_only
    # The state dict is the "model" entry, as for a torch.save file of the same state.
    assert dict(shapes) == {
        "0.weight": ((3, 4), "float32"),
        "0.bias": ((3,), "float32"),
        "2.weight": ((2, 3), "float32"),
        "2.bias": ((2,), "float32"),
    }


def test_convert_and_torch_save_write_plain_dicts(nested: Path, tmp_path: Path) -> None:
    from ckptmap.cli import main

    reference = torch_reference(nested, tmp_path)
    out = tmp_path / "converted.pth"
    assert main(["convert", str(nested), str(out)]) == 0
    assert_same(materialize(torch.load(out, weights_only=True)), materialize(reference))
    # A tree saved as it is pickles as the OrderedDict it stands for, not as a ckptmap class.
    saved = tmp_path / "saved.pth"
    torch.save(load_file(nested)["model"], saved)
    plain = torch.load(saved, weights_only=True)
    assert type(plain) is collections.OrderedDict
    assert_same(dict(plain), dict(reference["model"]))


def test_dry_run_plans_from_metadata_alone(flat: tuple[Path, Any], tmp_path: Path) -> None:
    directory = copy_dir(flat[0], tmp_path)
    for data in directory.glob("*.distcp"):  # no data byte is needed
        data.write_bytes(b"\0" * data.stat().st_size)
    model = build_net(5)
    model.head = nn.Linear(1024, 10)  # a shape mismatch to report
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = ckptmap.load_checkpoint(model, directory, dry_run=True)
    assert plan.header_only
    assert [m.name for m in plan.result.mismatched] == ["head.weight", "head.bias"]
    assert "backbone.0.weight" in plan.reads and "head.weight" not in plan.reads
    ckpt = DcpCheckpoint(flat[0])
    assert plan.bytes_to_read == sum(ckpt.info(n).nbytes for n in plan.reads)
    assert_same(dict(model.state_dict()), before)
