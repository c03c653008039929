"""safetensors files: typed header errors, zero-copy views, every dtype, partial reads.

The bad-header cases are those of RELIABILITY.md ("Safetensors headers"), in
tests/safetensors_cases.py; the core's own header tests, which need no torch, are in
tests/core/test_safetensors_header.py. Files are written by hand here so that header lengths
and data layouts can misalign the data, which `safetensors.torch.save_file` never does.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import pickle
import resource
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file
from safetensors_cases import BAD_FILES, GOOD_SEEDS, encode, entry, one, raw

from ckptmap._core import SafetensorsHeader
from ckptmap.errors import (
    CheckpointIsADirectoryError,
    CheckpointNotFoundError,
    CheckpointPermissionError,
    CkptmapError,
    CorruptCheckpointError,
    InvalidSafetensorsError,
    TensorNotFoundError,
    UnsupportedDtypeError,
)
from ckptmap.formats.safetensors import (
    SafetensorsFile,
    TensorInfo,
    load_file,
    load_safetensors,
    map_location_fn,
    open_safetensors,
)

# safetensors dtype -> torch dtype, for every one this torch has.
DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for name, attr in [
        ("F64", "float64"),
        ("F32", "float32"),
        ("F16", "float16"),
        ("BF16", "bfloat16"),
        ("I64", "int64"),
        ("I32", "int32"),
        ("I16", "int16"),
        ("I8", "int8"),
        ("U8", "uint8"),
        ("BOOL", "bool"),
        ("C64", "complex64"),
        ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E5M2", "float8_e5m2"),
        ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
        ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
        ("F8_E8M0", "float8_e8m0fnu"),
        ("U16", "uint16"),
        ("U32", "uint32"),
        ("U64", "uint64"),
    ]
    if isinstance(dtype := getattr(torch, attr, None), torch.dtype)
}


# --- writing files by hand ------------------------------------------------------------------


def raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes in memory order (little-endian on every machine torch runs on here)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def build(
    tensors: dict[str, torch.Tensor],
    *,
    layout: list[str] | None = None,
    pad: int = 0,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """A safetensors file: header in `tensors` order, data in `layout` order, `pad` spaces."""
    inverse = {v: k for k, v in DTYPES.items()}
    encoded = {n: (inverse[t.dtype], list(t.shape), raw_bytes(t)) for n, t in tensors.items()}
    return encode(encoded, layout=layout, pad=pad, metadata=metadata)


# --- the RELIABILITY.md cases ----------------------------------------------------------------

NEXT_STEP = ("re-download", "save it again", "save the weights again", "convert it")


def write(tmp_path: Path, data: bytes, name: str = "model.safetensors") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(("case", "data", "kind"), BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_header_is_a_typed_error_naming_the_file(
    tmp_path: Path, case: str, data: bytes, kind: str
) -> None:
    path = write(tmp_path, data)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(InvalidSafetensorsError) as info:
        SafetensorsFile(path)
    err = info.value
    assert err.kind == kind, err
    assert isinstance(err, (CorruptCheckpointError, CkptmapError, ValueError, RuntimeError))
    message = str(err)
    assert path in message
    assert any(step in message for step in NEXT_STEP), message
    assert err.path == path and err.size == len(data)
    # Nothing created, nothing changed.
    assert sorted(os.listdir(tmp_path)) == before
    assert Path(path).read_bytes() == data


@pytest.mark.parametrize("length", [2**64 - 1, 100_000_001, 100_000_000, 2**63])
def test_huge_header_length_is_rejected_before_allocating(tmp_path: Path, length: int) -> None:
    path = write(tmp_path, raw("{}", length=length))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(InvalidSafetensorsError):
        SafetensorsFile(path)
    assert time.perf_counter() - start < 0.5
    # ru_maxrss is in KiB: far less than the 100 MB a trusted length would allocate.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 20_000


def test_errors_survive_pickling(tmp_path: Path) -> None:
    path = write(tmp_path, raw(one(), bytes(5)))
    with pytest.raises(InvalidSafetensorsError) as info:
        SafetensorsFile(path)
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is InvalidSafetensorsError
    assert (str(again), again.kind, again.detail) == (
        str(info.value),
        info.value.kind,
        info.value.detail,
    )


def test_duplicate_names_that_safetensors_accepts_are_rejected(tmp_path: Path) -> None:
    # The reference loader silently keeps one of the two; ckptmap refuses to guess.
    data = raw('{"t":' + entry() + ',"t":' + entry() + "}", bytes(4))
    path = write(tmp_path, data)
    with pytest.raises(
        InvalidSafetensorsError, match=r"tensor \"t\" appears more than once"
    ) as info:
        SafetensorsFile(path)
    assert info.value.kind == "duplicate_name"
    assert "save the weights again" in str(info.value)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=96))
def test_arbitrary_bytes_never_panic(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path, data)
    try:
        f = SafetensorsFile(path)
    except InvalidSafetensorsError:
        return
    check_invariants(f)


GOOD = GOOD_SEEDS[1][1]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 16),
)
def test_mangled_files_never_panic(tmp_path: Path, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(GOOD)
    for at, value in edits:
        data[at] = value
    path = write(tmp_path, bytes(data[: len(data) - cut]))
    try:
        f = SafetensorsFile(path)
    except InvalidSafetensorsError:
        return
    check_invariants(f)
    for name in f:
        try:
            f[name]
        except UnsupportedDtypeError:
            pass


def check_invariants(f: SafetensorsFile) -> None:
    """Every accepted range has its shape's size, lies in the file and overlaps no other."""
    ranges = []
    for info in f.infos():
        dtype = info.torch_dtype
        numel = 1
        for d in info.shape:
            numel *= d
        if dtype is not None:
            assert info.nbytes == numel * dtype.itemsize
        assert f.header.data_offset <= info.start <= info.end <= f.header.file_size
        ranges.append((info.start, info.end))
    ranges.sort()
    for (_, end), (start, _) in itertools.pairwise(ranges):
        assert end <= start


# --- values, every dtype, misaligned data ----------------------------------------------------


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for d in shape:
        numel *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    size = torch.empty(0, dtype=dtype).element_size()
    data = torch.randint(0, 256, (numel * size,), dtype=torch.uint8, generator=g)
    return data.view(dtype).reshape(shape)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaNs and fp8 compare as bits)."""
    return a.dtype == b.dtype and a.shape == b.shape and raw_bytes(a) == raw_bytes(b)


tensor_specs = st.dictionaries(
    st.text(st.sampled_from("abc.0é"), min_size=1, max_size=6).filter(
        lambda n: n != "__metadata__"
    ),
    st.tuples(
        st.sampled_from(sorted(DTYPES)),
        st.lists(st.integers(0, 4), max_size=3).map(tuple),
        st.integers(0, 2**16),
    ),
    min_size=1,
    max_size=8,
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=40)
@given(specs=tensor_specs, pad=st.integers(0, 7), order=st.randoms(use_true_random=False))
def test_values_equal_safetensors_for_every_dtype_and_alignment(
    tmp_path: Path, specs: dict[str, tuple[str, tuple[int, ...], int]], pad: int, order: object
) -> None:
    tensors = {n: random_tensor(DTYPES[d], shape, seed) for n, (d, shape, seed) in specs.items()}
    layout = list(tensors)
    order.shuffle(layout)  # type: ignore[attr-defined]
    path = write(tmp_path, build(tensors, layout=layout, pad=pad))
    reference = st_load_file(path)
    f = SafetensorsFile(path)
    assert list(f) == list(tensors)
    for name, t in tensors.items():
        got = f[name]
        assert same(got, t), name
        assert same(got, reference[name]), name
        assert got.data_ptr() % got.element_size() == 0 or got.numel() == 0


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("pad", range(8))
def test_each_dtype_at_each_misalignment(tmp_path: Path, name: str, pad: int) -> None:
    # A 1-byte tensor first shifts the next one off its alignment, whatever the header.
    dtype = DTYPES[name]
    tensors = {
        "shift": torch.tensor([7], dtype=torch.uint8),
        "x": random_tensor(dtype, (3, 5), pad),
        "scalar": random_tensor(dtype, (), pad + 1),
    }
    path = write(tmp_path, build(tensors, pad=pad))
    reference = st_load_file(path)
    loaded = load_file(path)
    for key, t in tensors.items():
        assert same(loaded[key], t) and same(loaded[key], reference[key]), key
        assert loaded[key].data_ptr() % loaded[key].element_size() == 0


def test_files_written_by_safetensors_load_the_same(tmp_path: Path) -> None:
    tensors = {
        f"layer.{i}.{name}": random_tensor(dtype, (4, i + 1), i)
        for i, (name, dtype) in enumerate(DTYPES.items())
    }
    path = str(tmp_path / "ref.safetensors")
    st_save_file(tensors, path, metadata={"format": "pt", "note": "é"})
    state, metadata = load_safetensors(path)
    assert metadata == {"format": "pt", "note": "é"}
    assert set(state) == set(tensors)
    for key, t in tensors.items():
        assert same(state[key], t), key


def test_sub_byte_dtypes_plan_but_do_not_load(tmp_path: Path) -> None:
    header = (
        '{"f4":{"dtype":"F4","shape":[4],"data_offsets":[0,2]},'
        '"f6":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[2,5]},'
        '"ok":{"dtype":"U8","shape":[1],"data_offsets":[5,6]}}'
    )
    path = write(tmp_path, raw(header, bytes(6)))
    f = SafetensorsFile(path)
    assert [(i.name, i.dtype, i.nbytes) for i in f.infos()] == [
        ("f4", "float4_e2m1fn", 2),
        ("f6", "float6_e2m3fn", 3),
        ("ok", "uint8", 1),
    ]
    assert f["ok"].tolist() == [0]
    with pytest.raises(UnsupportedDtypeError, match=r"'f4'.*F4") as info:
        f["f4"]
    assert isinstance(info.value, TypeError) and path in str(info.value)


# --- zero copy -------------------------------------------------------------------------------


def map_base(f: SafetensorsFile) -> int:
    assert f._view is not None
    return torch.frombuffer(f._view, dtype=torch.uint8, count=1).data_ptr()


def test_aligned_tensors_are_views_of_the_map(tmp_path: Path) -> None:
    tensors = {n: random_tensor(d, (16, 3), i) for i, (n, d) in enumerate(DTYPES.items())}
    path = str(tmp_path / "aligned.safetensors")
    st_save_file(tensors, path)  # safetensors lays data out aligned
    f = SafetensorsFile(path)
    base = map_base(f)
    for info in f.infos():
        t = f[info.name]
        assert t.data_ptr() == base + info.start, info.name
        # The storage is exactly the tensor's bytes: saving it never drags the file along.
        assert t.untyped_storage().nbytes() == info.nbytes


def test_misaligned_tensors_are_copied_alone(tmp_path: Path) -> None:
    tensors = {"a": torch.tensor([1], dtype=torch.uint8), "b": torch.arange(6.0)}
    path = write(tmp_path, build(tensors, pad=0))
    f = SafetensorsFile(path)
    base = map_base(f)
    info = f.info("b")
    assert info.start % 4 != 0
    b = f["b"]
    assert not base <= b.data_ptr() < base + f.header.file_size
    assert b.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert f["a"].data_ptr() == base + f.info("a").start


def test_writing_to_a_tensor_never_changes_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "w.safetensors")
    st_save_file({"w": torch.zeros(1024)}, path)
    before = Path(path).read_bytes()
    t = load_file(path)["w"]
    t += 1  # copy-on-write: this process's pages only
    assert t.sum().item() == 1024
    assert Path(path).read_bytes() == before
    assert load_file(path)["w"].sum().item() == 0


def test_tensors_outlive_the_file_object(tmp_path: Path) -> None:
    path = str(tmp_path / "x.safetensors")
    st_save_file({"w": torch.arange(10.0)}, path)
    with open_safetensors(path) as f:
        t = f["w"]
    del f
    assert t.tolist() == list(map(float, range(10)))
    closed = SafetensorsFile(path)
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        closed["w"]


# --- the plan and partial reads ----------------------------------------------------------------

PAGE = mmap.PAGESIZE


def resident_fraction(path: str, start: int = 0, end: int | None = None) -> float:
    """The share of the file's pages in [start, end) that are in the page cache (mincore)."""
    size = os.path.getsize(path)
    end = size if end is None else end
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    try:
        addr = torch.frombuffer(memoryview(mm), dtype=torch.uint8, count=1).data_ptr()
        pages = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            pytest.skip(reason=f"mincore failed: errno {ctypes.get_errno()}")
        first, last = start // PAGE, (end + PAGE - 1) // PAGE
        return sum(v & 1 for v in vec[first:last]) / max(1, last - first)
    finally:
        del mm  # dropped, never closed: the tensor above may still point into it


def evict(path: str) -> None:
    """Drops the file's clean pages from the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if resident_fraction(path) > 0.01:
        pytest.skip(reason="this filesystem keeps the file cached despite POSIX_FADV_DONTNEED")


@pytest.fixture
def big_file(tmp_path: Path) -> str:
    # 40 layers x 1 MiB of float32 = 40 MiB.
    path = str(tmp_path / "big.safetensors")
    st_save_file({f"layers.{i}.w": torch.full((512, 512), float(i)) for i in range(40)}, path)
    return path


def test_the_plan_reads_no_tensor_data(big_file: str) -> None:
    evict(big_file)
    f = SafetensorsFile(big_file)
    infos = f.infos()
    assert len(infos) == 40 and all(i.shape == (512, 512) and i.dtype == "float32" for i in infos)
    assert sum(i.nbytes for i in infos) == f.nbytes == 40 * 2**20
    assert resident_fraction(big_file, f.header.data_offset) < 0.01


def test_prefix_load_reads_about_its_share_of_the_file(big_file: str) -> None:
    evict(big_file)
    f = SafetensorsFile(big_file)
    chosen = f.load([f"layers.{i}.w" for i in range(4)])  # 10% of the tensors and bytes
    model = {k: torch.empty(512, 512) for k in chosen}
    for k, t in chosen.items():
        model[k].copy_(t)
    assert all(model[f"layers.{i}.w"][0, 0].item() == i for i in range(4))
    share = resident_fraction(big_file, f.header.data_offset)
    assert 0.09 <= share <= 0.13, share


def test_load_selects_names_and_prefixes(tmp_path: Path) -> None:
    tensors = {
        "backbone.a": torch.ones(1),
        "backbone2.b": torch.ones(1),
        "head.c": torch.ones(1),
        "backbone.d.e": torch.ones(1),
    }
    path = write(tmp_path, build(tensors))
    f = SafetensorsFile(path)
    assert list(f.load(prefix="backbone")) == ["backbone.a", "backbone.d.e"]
    assert list(f.load(["head.c", "backbone.a"])) == ["head.c", "backbone.a"]
    assert list(f.load(["head.c", "backbone.a"], prefix="head.")) == ["head.c"]
    with pytest.raises(TensorNotFoundError, match="'nope'") as info:
        f.load(["nope"])
    assert isinstance(info.value, KeyError) and path in str(info.value)
    assert f.get("nope") is None and "head.c" in f and 3 not in f


def test_info_and_header_columns(tmp_path: Path) -> None:
    tensors = {"z": torch.zeros(2, 3, dtype=torch.float16), "a": torch.zeros(5, dtype=torch.int64)}
    data = build(tensors, layout=["a", "z"], pad=3, metadata={"k": "v"})
    path = write(tmp_path, data)
    f = SafetensorsFile(path)
    h = f.header
    assert h.names == ["z", "a"]
    assert h.safetensors_dtypes == ["F16", "I64"]
    assert h.shapes == [(2, 3), (5,)]
    assert h.metadata == f.metadata == {"k": "v"}
    assert h.file_size == len(data) and len(h) == 2
    assert h.data_offset == 8 + h.header_len
    assert f.info("a") == TensorInfo("a", "int64", (5,), h.data_offset, h.data_offset + 40)
    assert f.info("z").nbytes == 12 and f.info("z").torch_dtype == torch.float16
    assert (f.names, f.dtypes, f.shapes, f.sizes) == (
        ["z", "a"],
        ["float16", "int64"],
        [(2, 3), (5,)],
        [12, 40],
    )
    f.names.append("x")  # a copy: the file's own list is untouched
    assert len(f) == 2 and f.names == ["z", "a"]
    assert "tensors=2" in repr(f) and "tensors=2" in repr(h)


# --- map_location ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "location",
    [None, "cpu", torch.device("cpu"), {"cpu": "cpu"}, {"cuda:0": "cpu"}, lambda s, loc: None],
    ids=["none", "str", "device", "dict", "dict-other", "callable-none"],
)
def test_map_location_keeping_tensors_on_cpu(tmp_path: Path, location: object) -> None:
    path = str(tmp_path / "m.safetensors")
    st_save_file({"w": torch.arange(4.0)}, path)
    f = SafetensorsFile(path, map_location=location)
    base = map_base(f)
    assert f["w"].data_ptr() == base + f.info("w").start  # still zero-copy


def test_map_location_callable_and_meta(tmp_path: Path) -> None:
    path = str(tmp_path / "m.safetensors")
    st_save_file({"w": torch.arange(6.0).reshape(2, 3)}, path)
    calls: list[str] = []

    def clone(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        calls.append(location)
        return storage.clone()

    t = load_file(path, map_location=clone)["w"]
    assert calls == ["cpu"] and t.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert load_file(path, map_location="meta")["w"].device.type == "meta"
    assert load_file(path, map_location={"cpu": "meta"})["w"].is_meta
    with pytest.raises(TypeError, match="map_location"):
        map_location_fn(3.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_map_location_cuda(tmp_path: Path) -> None:
    path = str(tmp_path / "m.safetensors")
    st_save_file({"w": torch.arange(6.0)}, path)
    t = load_file(path, map_location="cuda")["w"]
    assert t.is_cuda and t.cpu().tolist() == list(map(float, range(6)))


# --- paths -------------------------------------------------------------------------------------


def test_path_errors_keep_their_types(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="missing"):
        SafetensorsFile(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointIsADirectoryError):
        SafetensorsFile(tmp_path)
    link = tmp_path / "dangling.safetensors"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(CheckpointNotFoundError, match="nowhere"):
        SafetensorsFile(link)
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CorruptCheckpointError, match="regular file"):
        SafetensorsFile(fifo)  # must not block
    with pytest.raises(OSError) as info:
        SafetensorsHeader.open(tmp_path / "missing")
    assert type(info.value) is FileNotFoundError and info.value.filename


def test_permission_denied_is_its_own_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As root a mode-000 file is still readable, so the refusal is simulated at os.open.
    import ckptmap.formats.safetensors as reader

    path = tmp_path / "locked.safetensors"
    st_save_file({"w": torch.ones(1)}, str(path))

    def refuse(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(reader.os, "open", refuse)
    with pytest.raises(CheckpointPermissionError, match="permission denied"):
        SafetensorsFile(path)


def test_without_descriptor_support_the_header_is_read_by_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where the core cannot map a descriptor (SafetensorsHeader.from_fd is POSIX-only), the
    # header is read by path, and the path must still be the file that was opened.
    import ckptmap.formats.safetensors as module

    replace_with: list[str] = []

    class PathOnly:
        @staticmethod
        def open(path: str) -> SafetensorsHeader:
            for other in replace_with:
                os.replace(other, path)
            return SafetensorsHeader.open(path)

    monkeypatch.setattr(module, "SafetensorsHeader", PathOnly)
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    path = write(tmp_path, build(tensors))
    f = SafetensorsFile(path)
    assert all(same(f[k], t) for k, t in tensors.items())
    with pytest.raises(InvalidSafetensorsError) as info:
        SafetensorsFile(write(tmp_path, raw("[]"), "bad.safetensors"))
    assert info.value.kind == "not_an_object"
    # Replaced between the open and the read: refused, not a header of one file over another.
    replace_with.append(write(tmp_path, build({"w": torch.zeros(7)}), "other.safetensors"))
    with pytest.raises(CorruptCheckpointError, match="replaced while it was being opened"):
        SafetensorsFile(path)


def test_pathlike_and_user_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st_save_file({"w": torch.ones(2)}, str(tmp_path / "m.safetensors"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert SafetensorsFile("~/m.safetensors").path == str(tmp_path / "m.safetensors")
    assert SafetensorsFile(tmp_path / "m.safetensors")["w"].tolist() == [1.0, 1.0]


def test_the_dispatcher_routes_safetensors_here(tmp_path: Path) -> None:
    from ckptmap.formats import load_file as dispatch

    path = str(tmp_path / "named.pth")  # the name never decides
    st_save_file({"w": torch.arange(3.0)}, path)
    assert dispatch(path)["w"].tolist() == [0.0, 1.0, 2.0]
