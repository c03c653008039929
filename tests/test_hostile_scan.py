"""Work-dir scans stay cheap: judging a candidate never decompresses it or reads it whole.

A work dir holds a real checkpoint beside a zip bomb (a deflated ``data.pkl`` that would
inflate to 256 MiB), a torch zip whose stored ``data.pkl`` is 96 MiB, and a safetensors file
whose header describes 4 GiB of (sparse) data. `find_latest_checkpoint` runs in a child
process that counts every decompressor zlib creates and the bytes its read() calls return
(``rchar`` of /proc/self/io, which counts the Rust header reader's reads too): no
decompression, and a few MiB at most for all the candidates together.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from ckptmap.latest import is_complete_checkpoint

MIB = 1 << 20

CHILD = textwrap.dedent(
    """
    import json, sys, warnings, zlib

    from ckptmap.latest import find_latest_checkpoint, list_checkpoints

    inflaters = []
    real_decompressobj, real_decompress = zlib.decompressobj, zlib.decompress

    def decompressobj(*args, **kwargs):
        inflaters.append("decompressobj")
        return real_decompressobj(*args, **kwargs)

    def decompress(*args, **kwargs):
        inflaters.append("decompress")
        return real_decompress(*args, **kwargs)

    zlib.decompressobj, zlib.decompress = decompressobj, decompress

    def rchar():
        with open("/proc/self/io") as io:
            return int(next(l for l in io if l.startswith("rchar:")).split()[1])

    before = rchar()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        latest = find_latest_checkpoint(sys.argv[1])
        listed = list_checkpoints(sys.argv[1])
    read = rchar() - before
    print(json.dumps({
        "latest": latest, "listed": listed, "read": read, "inflaters": inflaters,
        "warnings": [str(w.message) for w in caught],
    }))
    """
)


def _torch_zip_with(path: Path, pickle_member: bytes, method: int) -> None:
    """A torch.save zip whose data.pkl is `pickle_member` (the real pickle plus padding)."""
    real = path.with_suffix(".real")
    torch.save({"w": torch.ones(2)}, real)
    with zipfile.ZipFile(real) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                member = zipfile.ZipInfo(info.filename)
                member.compress_type = method
                with zout.open(member, "w", force_zip64=True) as out:
                    out.write(data)
                    for start in range(0, len(pickle_member), MIB):
                        out.write(pickle_member[start : start + MIB])
            else:
                zout.writestr(info.filename, data)
    real.unlink()


def _sparse_safetensors(path: Path, nbytes: int) -> None:
    header = json.dumps(
        {"w": {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + nbytes)


@pytest.fixture
def work(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    torch.save({"state_dict": {"w": torch.ones(3)}}, work / "epoch_1.pth")
    zeros = bytes(256 * MIB)
    _torch_zip_with(work / "epoch_7.pth", zeros, zipfile.ZIP_DEFLATED)  # the bomb
    _torch_zip_with(work / "epoch_8.pth", bytes(96 * MIB), zipfile.ZIP_STORED)  # big pickle
    _sparse_safetensors(work / "epoch_9.safetensors", 4 << 30)  # 4 GiB, mostly holes
    del zeros
    return work


def test_scans_never_inflate_or_read_candidates_whole(work):
    assert (work / "epoch_7.pth").stat().st_size < 4 * MIB  # it would inflate to 256 MiB
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(work)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["inflaters"] == [], result
    # Two scans (no pointer, then a listing) over four candidates: a few MiB in all, while the
    # candidates hold 4 GiB + 96 MiB and the bomb would inflate to 256 MiB.
    assert result["read"] < 8 * MIB, result
    names = [os.path.basename(p) for p in result["listed"]]
    # The bomb is not a usable checkpoint; the others are complete.
    assert names == ["epoch_1.pth", "epoch_8.pth", "epoch_9.safetensors"], result


def test_the_work_dir_scan_picks_the_newest_complete_candidate(work):
    (work / "last_checkpoint").write_text(str(work / "epoch_7.pth"))
    with pytest.warns(UserWarning, match="epoch_7.pth"):
        from ckptmap.latest import find_latest_checkpoint

        assert find_latest_checkpoint(work) == str(work / "epoch_9.safetensors")
    assert not is_complete_checkpoint(work / "epoch_7.pth")
    # A truncated big candidate is judged incomplete, still without reading it.
    os.truncate(work / "epoch_9.safetensors", (4 << 30) - 1)
    assert not is_complete_checkpoint(work / "epoch_9.safetensors")
    data = (work / "epoch_8.pth").read_bytes()
    (work / "epoch_8.pth").write_bytes(data[: len(data) - 30])
    assert not is_complete_checkpoint(work / "epoch_8.pth")
