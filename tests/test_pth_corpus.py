"""The seed corpus of the torch zip reader's fuzz targets (``fuzz/corpus/pth``, ``fuzz/corpus/
pickle``), and the reader's verdict on each seed.

Every seed starts as a real ``torch.save`` checkpoint, re-packed deterministically (fixed
timestamps, a fixed serialization id) so the committed files can be checked to stay in step
with the cases below; bad seeds are then damaged the way the adversarial tests damage them.
``python tests/test_pth_corpus.py fuzz/corpus`` rewrites both directories.
"""

from __future__ import annotations

import collections
import io
import os
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ckptmap._core import PthFormatError, PthReader

CORPUS = Path(__file__).resolve().parent.parent / "fuzz" / "corpus"


def saved(obj: object, **kwargs: object) -> list[tuple[str, bytes]]:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)  # type: ignore[arg-type]
    with zipfile.ZipFile(buf) as z:
        return [
            (i.filename, b"0" * i.file_size if "serialization_id" in i.filename else z.read(i))
            for i in z.infolist()
        ]


def packed(entries: list[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = compression
            z.writestr(info, data)
    return buf.getvalue()


def seeded(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def state_dict() -> collections.OrderedDict:
    w = seeded((3, 4), 0)
    sd = collections.OrderedDict(
        w=w, v=w[1:, 2:], b=torch.nn.Parameter(seeded((4,), 1)), n=torch.tensor(7)
    )
    sd._metadata = collections.OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    return sd


def nested() -> dict:
    return {
        "state_dict": state_dict(),
        "optimizer": {"state": {0: {"step": seeded((), 2)}}, "param_groups": [{"lr": 0.1}]},
        "meta": {"epoch": 3, "names": ("a", "b"), "big": 2**80, "f": 1.5, "bytes": b"xy"},
        "dtypes": [seeded((2,), 3, dt) for dt in (torch.float16, torch.bfloat16, torch.int8)],
        "new": seeded((2,), 4).to(torch.float8_e4m3fn),
    }


class Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("true",))


def edit(entries: list[tuple[str, bytes]], suffix: str, change: Callable[[bytes], bytes]):
    return [(n, change(d) if n.endswith(suffix) else d) for n, d in entries]


def cases() -> dict[str, tuple[bytes, str]]:
    """name -> (file, expected verdict: "ready", "fallback" or an error kind)."""
    sd = saved(state_dict())
    out: dict[str, tuple[bytes, str]] = {
        "good_state_dict": (packed(sd), "ready"),
        "good_nested": (packed(saved(nested())), "ready"),
        "good_protocol4": (packed(saved(nested(), pickle_protocol=4)), "ready"),
        "good_lone_tensor": (packed(saved(seeded((2, 2), 5))), "ready"),
        "fallback_malicious": (packed(saved({"x": Evil()})), "fallback"),
        "fallback_quantized": (
            packed(saved({"q": torch.quantize_per_tensor(torch.ones(2), 0.5, 0, torch.quint8)})),
            "fallback",
        ),
        "bad_compressed": (packed(sd, zipfile.ZIP_DEFLATED), "compressed_member"),
        "bad_duplicate": (packed([*sd, sd[-1]]), "duplicate_member"),
        "bad_name": (packed([*sd, ("archive/../x", b"")]), "bad_member_name"),
        "bad_missing_pickle": (
            packed([e for e in sd if not e[0].endswith("data.pkl")]),
            "missing_record",
        ),
        "bad_missing_record": (
            packed([e for e in sd if not e[0].endswith("data/0")]),
            "missing_record",
        ),
        "bad_byteorder": (packed(edit(sd, "/byteorder", lambda _: b"middle")), "bad_byteorder"),
        "bad_record_size": (
            packed(edit(sd, "data/0", lambda d: d + b"\0" * 4)),
            "storage_size_mismatch",
        ),
    }
    data = bytearray(packed(sd))
    data[data.index(b"storage")] ^= 1
    out["bad_crc"] = (bytes(data), "crc_mismatch")
    out["bad_truncated"] = (packed(sd)[:-30], "no_end_record")
    return out


def verdict(data: bytes, tmp: Path) -> str:
    path = tmp / "seed.pth"
    path.write_bytes(data)
    try:
        reader = PthReader.open(path)
    except PthFormatError as err:
        return err.kind
    return "ready" if reader.fallback_reason is None else "fallback"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_seed_gets_its_verdict(tmp_path: Path) -> None:
    for name, (data, expected) in cases().items():
        assert verdict(data, tmp_path) == expected, name


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fuzz_seed_corpus_matches_the_cases() -> None:
    """``python tests/test_pth_corpus.py fuzz/corpus`` rewrites the corpus."""
    expected_pth, expected_pickle = corpus_files()
    for sub, expected in (("pth", expected_pth), ("pickle", expected_pickle)):
        found = {p.name: p.read_bytes() for p in (CORPUS / sub).iterdir()}
        assert found == expected, sub


def corpus_files() -> tuple[dict[str, bytes], dict[str, bytes]]:
    pth, pickles = {}, {}
    for name, (data, _) in cases().items():
        pth[f"{name}.pth"] = data
        if name.startswith(("good", "fallback")):
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                pickles[f"{name}.pkl"] = z.read("archive/data.pkl")
    return pth, pickles


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    root = Path(sys.argv[1])
    for sub, files in zip(("pth", "pickle"), corpus_files(), strict=True):
        out = root / sub
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.iterdir():
            stale.unlink()
        for name, data in files.items():
            (out / name).write_bytes(data)
