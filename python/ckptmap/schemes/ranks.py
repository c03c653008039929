"""Download once per machine in a distributed job, wait as long as it takes, and fail together.

In a `torch.distributed` job every rank asks for the same remote checkpoint. The local rank 0
of each machine (its leader) fetches it into the cache while the other ranks wait; then they
all use the cached file.

The waiting does not go through a collective (a barrier or `all_gather`): those give up after
the process group's timeout, which a large download can easily outlast, and then fail every
rank, the leader included, after its download succeeded. Instead the ranks meet in the process
group's key-value store (the one `init_process_group` created), with a deadline of their own:

1. every rank counts itself in (``arrived``, and ``leaders`` for the leaders);
2. each leader fetches, then publishes its outcome (the result, or its error, pickled) and
   counts itself done;
3. every rank polls the store until all ranks have arrived and all leaders are done, reads
   the outcome (the first published error, or its leader's result), counts itself finished
   and waits until every rank has (rank 0 hosts the store and must outlive every read), then
   raises that error or returns that result.

So a slow download never times out the other ranks, a failed one makes every rank raise the
same error (with its original type) promptly, and a leader that succeeded returns normally.
The deadline is ``CKPTMAP_DIST_WAIT_S`` seconds (default 6 hours); a rank that gives up raises
`DownloadError` saying what it waited for.

Outside of an initialised process group this is just ``fetch()``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import pickle
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ckptmap.dist import get_dist_info
from ckptmap.errors import DownloadError
from ckptmap.redact import redact_url

__all__ = ["ENV_DIST_WAIT_S", "fetch_on_local_leader"]

logger = logging.getLogger("ckptmap")

T = TypeVar("T")

#: How long the ranks wait for the leaders' downloads, in seconds (default 6 hours).
ENV_DIST_WAIT_S = "CKPTMAP_DIST_WAIT_S"
DEFAULT_WAIT_S = 6 * 3600.0
#: The first poll comes after this many seconds; polls back off to `_MAX_POLL_S`.
_FIRST_POLL_S = 0.01
_MAX_POLL_S = 0.5
#: A waiting rank says what it waits for once, after this many seconds.
_ANNOUNCE_AFTER_S = 30.0

# Every rank calls fetch_on_local_leader in the same order, so the n-th call on one rank meets
# the n-th call on every other rank under the same store keys.
_calls = itertools.count()


def _local_rank(rank: int) -> int:
    value = os.environ.get("LOCAL_RANK")
    try:
        return int(value) if value is not None else rank
    except ValueError:
        return rank


def _wait_budget_s() -> float:
    value = os.environ.get(ENV_DIST_WAIT_S)
    try:
        return float(value) if value else DEFAULT_WAIT_S
    except ValueError:
        return DEFAULT_WAIT_S


def _portable(error: BaseException, rank: int, what: str) -> BaseException:
    """`error` if it survives pickling with the same message, else a DownloadError saying so."""
    try:
        copy = pickle.loads(pickle.dumps(error))
        if type(copy) is type(error) and str(copy) == str(error):
            return error
    except Exception:
        pass
    return DownloadError(
        f"rank {rank} could not fetch {redact_url(what)}: {type(error).__name__}: {error}",
        url=what,
    )


def _default_store() -> Any:
    """The default process group's key-value store, or None when it can not be reached."""
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:  # a torch without it, or a group without a store
        return None


class _Meeting:
    """The store keys of one `fetch_on_local_leader` call."""

    def __init__(self, store: Any, what: str, world_size: int) -> None:
        digest = hashlib.sha256(what.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        self.base = f"ckptmap/fetch/{next(_calls)}/{digest}"
        self.store = store
        self.world_size = world_size

    def key(self, name: str) -> str:
        return f"{self.base}/{name}"

    def count(self, name: str, by: int = 1) -> int:
        return int(self.store.add(self.key(name), by))

    def publish(self, name: str, value: Any) -> None:
        self.store.set(self.key(name), pickle.dumps(value))

    def read(self, name: str) -> Any:
        return pickle.loads(self.store.get(self.key(name)))

    def has(self, name: str) -> bool:
        return bool(self.store.check([self.key(name)]))

    def wait(self, ready: Callable[[], bool], what: str, deadline: float) -> None:
        """Polls `ready` until it holds; raises `DownloadError` past `deadline`."""
        delay = _FIRST_POLL_S
        started = time.monotonic()
        announced = False
        while not ready():
            now = time.monotonic()
            if now >= deadline:
                raise DownloadError(
                    f"gave up after {now - started:.0f} s waiting for {what}: the other "
                    f"ranks did not report (raise {ENV_DIST_WAIT_S} for very slow downloads, "
                    "or check the other ranks' logs)",
                    url=what,
                )
            if not announced and now - started >= _ANNOUNCE_AFTER_S:
                logger.info("Still waiting for %s", what)
                announced = True
            time.sleep(min(delay, max(0.0, deadline - now)))
            delay = min(_MAX_POLL_S, delay * 2)


def fetch_on_local_leader(fetch: Callable[[], T], what: str) -> T:
    """Runs `fetch` on each machine's local rank 0; the other ranks use its result.

    Outside of an initialised process group this is just ``fetch()``. Inside one, every rank
    must call it, in the same order as the others (like a collective), but no rank waits on
    the process group's timeout: see the module docstring.

    Args:
        fetch: downloads into the cache (or finds the file there) and returns the result.
            It runs on the leaders only; the other ranks of a machine get its leader's result
            (or run `fetch` themselves when that result can not be pickled).
        what: the URL or URI, for messages (secrets are masked).

    Raises:
        Whatever `fetch` raised on a leader, on every rank (the leader's own exception on the
        leader; an equal copy elsewhere).
        DownloadError: the wait outlasted ``CKPTMAP_DIST_WAIT_S``.
    """

    rank, world_size = get_dist_info()
    if world_size <= 1:
        return fetch()
    store = _default_store()
    if store is None:
        return _fetch_with_collectives(fetch, what, rank, world_size)
    shown = redact_url(what)
    meeting = _Meeting(store, what, world_size)
    leader_rank = rank - _local_rank(rank)
    leader = leader_rank == rank
    deadline = time.monotonic() + _wait_budget_s()
    if leader:
        meeting.count("leaders")
    meeting.count("arrived")
    result: Any = None
    error: BaseException | None = None
    if leader:
        try:
            result = fetch()
        except Exception as exc:  # shared with the other ranks below, then re-raised
            error = exc
        if error is not None:
            meeting.publish("failed", (rank, _portable(error, rank, what)))
        else:
            try:
                meeting.publish(f"result/{rank}", ("ok", result))
            except Exception:  # not picklable: the others fetch for themselves
                meeting.publish(f"result/{rank}", ("fetch", None))
        meeting.count("done")
    meeting.wait(
        lambda: meeting.count("arrived", 0) >= world_size,
        f"all {world_size} ranks to ask for {shown}",
        deadline,
    )
    leaders = meeting.count("leaders", 0)
    meeting.wait(
        lambda: meeting.count("done", 0) >= leaders,
        f"the local rank 0 of every machine to fetch {shown}",
        deadline,
    )
    outcome = _outcome(meeting, error, result, leader, leader_rank, shown)
    # Leave together: rank 0 hosts the store, and must not exit (taking the store with it)
    # while another rank still reads its outcome from it.
    meeting.count("finished")
    meeting.wait(
        lambda: meeting.count("finished", 0) >= world_size,
        f"all {world_size} ranks to read the outcome of fetching {shown}",
        deadline,
    )
    kind, value = outcome
    if kind == "raise":
        raise value
    if kind == "fetch":
        return fetch()
    return value  # type: ignore[no-any-return]


def _outcome(
    meeting: _Meeting,
    error: BaseException | None,
    result: Any,
    leader: bool,
    leader_rank: int,
    shown: str,
) -> tuple[str, Any]:
    """What this rank ends with: ("raise", error), ("ok", result) or ("fetch", None)."""
    if error is not None:
        return "raise", error
    if meeting.has("failed"):
        failed_rank, failure = meeting.read("failed")
        if hasattr(failure, "add_note"):
            failure.add_note(f"(raised on rank {failed_rank}, which was fetching {shown})")
        return "raise", failure
    if leader:
        return "ok", result
    if not meeting.has(f"result/{leader_rank}"):
        # LOCAL_RANK does not match the ranks' layout: fetch here (the cache makes it cheap).
        return "fetch", None
    kind, value = meeting.read(f"result/{leader_rank}")
    return ("fetch", None) if kind == "fetch" else ("ok", value)


def _fetch_with_collectives(fetch: Callable[[], T], what: str, rank: int, world_size: int) -> T:
    """The fallback without a store: one `all_gather_object` of every leader's outcome."""
    import torch.distributed as dist

    leader = _local_rank(rank) == 0
    result: T | None = None
    error: BaseException | None = None
    if leader:
        try:
            result = fetch()
        except Exception as exc:
            error = exc
    outcomes: list[BaseException | None] = [None] * world_size
    dist.all_gather_object(outcomes, None if error is None else _portable(error, rank, what))
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(outcomes) if e is not None]
    if failed:
        failed_rank, failure = failed[0]
        if hasattr(failure, "add_note"):
            failure.add_note(
                f"(raised on rank {failed_rank}, which was fetching {redact_url(what)})"
            )
        raise failure
    if leader:
        return result  # type: ignore[return-value]
    return fetch()
