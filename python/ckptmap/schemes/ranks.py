"""Download once per machine in a distributed job, and fail together.

In a `torch.distributed` job every rank asks for the same remote checkpoint. The local rank 0
of each machine fetches it into the cache while the other ranks wait; then they all read the
cached file. Instead of a bare barrier (which hangs every other rank when rank 0 raises before
reaching it), each rank contributes the outcome of its fetch to one `all_gather_object`: if
any machine's fetch failed, every rank raises that error, with its original type, right away.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import TypeVar

from ckptmap.errors import DownloadError

__all__ = ["fetch_on_local_leader"]

T = TypeVar("T")


def _local_rank(rank: int) -> int:
    value = os.environ.get("LOCAL_RANK")
    try:
        return int(value) if value is not None else rank
    except ValueError:
        return rank


def _portable(error: BaseException, rank: int, what: str) -> BaseException:
    """`error` if it survives pickling with the same message, else a DownloadError saying so."""
    try:
        copy = pickle.loads(pickle.dumps(error))
        if type(copy) is type(error) and str(copy) == str(error):
            return error
    except Exception:
        pass
    return DownloadError(
        f"rank {rank} could not fetch {what}: {type(error).__name__}: {error}", url=what
    )


def fetch_on_local_leader(fetch: Callable[[], T], what: str) -> T:
    """Runs `fetch` on each machine's local rank 0 first, then on the other ranks.

    Outside of an initialised process group this is just ``fetch()``. Inside one, every rank
    must call it (it is a collective).

    Args:
        fetch: downloads into the cache (or finds the file there) and returns the result.
            On the non-leader ranks it runs after the leader's succeeded, so it should find
            the cached file.
        what: the URL or URI, for messages.

    Raises:
        Whatever `fetch` raised on a leader, on every rank (the leader's own exception on the
        leader; an equal copy elsewhere).
    """
    from ckptmap.dist import get_dist_info

    rank, world_size = get_dist_info()
    if world_size <= 1:
        return fetch()
    import torch.distributed as dist

    leader = _local_rank(rank) == 0
    result: T | None = None
    error: BaseException | None = None
    if leader:
        try:
            result = fetch()
        except Exception as exc:  # shared with the other ranks below, then re-raised
            error = exc
    outcomes: list[BaseException | None] = [None] * world_size
    dist.all_gather_object(outcomes, None if error is None else _portable(error, rank, what))
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(outcomes) if e is not None]
    if failed:
        failed_rank, failure = failed[0]
        if hasattr(failure, "add_note"):
            failure.add_note(f"(raised on rank {failed_rank}, which was fetching {what})")
        raise failure
    if leader:
        return result  # type: ignore[return-value]
    return fetch()
