"""Remote checkpoints read by byte range: only the header(s) and the tensors a load uses.

The flow, one module per step:

- `opener`: which ``http(s)://`` and ``s3://`` URIs are read by range (`open_remote`), and the
  whole-download fallback (servers without range support, pickles, what only torch reads);
- `checkpoint`: the opened `Checkpoint`s (one safetensors file; a shard set);
- `safetensors`: the header by range, validated in the Rust core; tensors allocated, then
  filled;
- `pth`: a torch zip (``.pth``, ``.bin`` shards): the zip directory and ``data.pkl`` by
  range into a sparse temp file the Rust reader parses in part, then the records asked for;
- `spans`: which ranges to ask for (merged when close, cut to a size);
- `reader`: one file read by range, every answer checked (206, Content-Range, length, the
  same ETag / Last-Modified / size), retries, the bounded thread pool;
- `web_ranges`, `s3_ranges`: the transports (urllib, boto3).
"""

from ckptmap.opened import URI_OPENERS
from ckptmap.remote.opener import open_remote
from ckptmap.remote.safetensors import RangeOptions

__all__ = ["RangeOptions", "open_remote"]

# `ckptmap.open_checkpoint` tries this opener for every URI before the scheme's loader.
if open_remote not in URI_OPENERS:
    URI_OPENERS.append(open_remote)
