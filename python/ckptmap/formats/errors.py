"""Errors and warnings of the format layer (sniffing and pickle loading).

Each is a `CkptmapError` and also the builtin (or `pickle.UnpicklingError`) that `torch.load`
raises in the same situation, so ``except RuntimeError:`` / ``except pickle.UnpicklingError:``
clauses written around `torch.load` keep working. Every message names the file, says what
the file looks like and what to do next.

These are meant to move into `ckptmap.errors` once the format layer settles.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

from ckptmap.errors import CheckpointNotFoundError, CkptmapError

__all__ = [
    "CorruptCheckpointError",
    "DanglingSymlinkError",
    "TorchScriptArchiveError",
    "UnsafeCheckpointError",
    "UnsafeLoadWarning",
]


# What the MMENGINE_RUNNER allowlist's getattr says when a pickle asks it for anything else.
_RESTRICTED_GETATTR = "allowlist only resolves HistoryBuffer's statistics methods"


class DanglingSymlinkError(CheckpointNotFoundError):
    """The checkpoint path is a symlink whose target does not exist.

    Attributes:
        path: the path as given.
        target: what the link points to.
    """

    def __init__(self, path: str, target: str) -> None:
        super().__init__(
            path,
            f"checkpoint path {path!r} is a symlink to {target!r}, which does not exist: fix "
            "or remove the link, or fetch the file it points to",
        )
        self.target = target
        self._init_args = (path, target)


class CorruptCheckpointError(CkptmapError, RuntimeError):
    """The file is empty, truncated, damaged or not a checkpoint at all.

    A `RuntimeError`, as `torch.load` raises for a damaged zip archive.

    Attributes:
        path: the file.
        size: its size in bytes.
        looks_like: what the content looks like (e.g. "an HTML page", "empty").
    """

    def __init__(self, path: str, size: int, looks_like: str, hint: str | None = None) -> None:
        self._init_args = (path, size, looks_like, hint)
        self.path = path
        self.size = size
        self.looks_like = looks_like
        hint = hint or (
            "re-download or re-copy it (if it came from a download cache, delete that cache "
            "entry so the next run fetches it again)"
        )
        super().__init__(
            f"checkpoint file {path!r} ({size:,} bytes) is corrupt or truncated: it looks like "
            f"{looks_like}. {hint[0].upper()}{hint[1:]}"
        )


class TorchScriptArchiveError(CkptmapError, RuntimeError):
    """The file is a TorchScript archive (`torch.jit.save`), not a `torch.save` checkpoint."""

    def __init__(self, path: str) -> None:
        self._init_args = (path,)
        self.path = path
        super().__init__(
            f"{path!r} is a TorchScript archive, not a checkpoint: load it with "
            "torch.jit.load (it holds a compiled module, not a state dict); to use its weights "
            "here, save `torch.jit.load(path).state_dict()` with torch.save"
        )


class UnsafeCheckpointError(CkptmapError, pickle.UnpicklingError):
    """A pickle checkpoint needs globals that the safe (``weights_only=True``) loader refuses.

    An `pickle.UnpicklingError`, as `torch.load(weights_only=True)` raises. Nothing in the file
    was executed beyond torch's own allowlisted constructors; the file is never retried with
    ``weights_only=False``.

    Attributes:
        path: the file.
        globals: every ``module.name`` the pickle references that is not allowed, sorted.
        dangerous: the subset that can run arbitrary code (``os.system``, ``builtins.eval``, ...).
        reason: torch's own message, when it gave one.
    """

    def __init__(
        self,
        path: str,
        globals: Sequence[str],
        dangerous: Sequence[str] = (),
        reason: str | None = None,
    ) -> None:
        self._init_args = (path, tuple(globals), tuple(dangerous), reason)
        self.path = path
        self.globals = sorted(globals)
        self.dangerous = sorted(dangerous)
        self.reason = reason
        mmengine = any(g.startswith("mmengine.logging.") for g in self.globals)
        # mmengine's HistoryBuffer pickles its methods through getattr; MMENGINE_RUNNER
        # allows exactly that use, so it is no sign of malice there.
        alarming = [g for g in self.dangerous if not (mmengine and g == "builtins.getattr")]
        if alarming:
            message = (
                f"refusing to load {path!r}: its pickle calls {', '.join(alarming)}, which can "
                "run arbitrary code. This is what a malicious checkpoint looks like; nothing "
                "from it was executed. Do not load it unless you wrote it yourself"
            )
            if benign := [g for g in self.globals if g not in alarming]:
                message += f" (it also needs {', '.join(benign)})"
        elif self.globals:
            if mmengine:
                opt_in = (
                    "This looks like a checkpoint written by mmengine's Runner: if you trust "
                    "it, pass `allowed_globals=ckptmap.formats.allowlist.MMENGINE_RUNNER`"
                )
            elif all(g.startswith("numpy.") for g in self.globals):
                opt_in = (
                    "If you trust the file, pass `allowed_globals=ckptmap.formats.allowlist.NUMPY`"
                )
            else:
                opt_in = (
                    "If you trust the file, pass exactly these objects (the classes or "
                    "functions themselves) as `allowed_globals=[...]`, or `weights_only=False` "
                    "to unpickle it without restrictions"
                )
            message = (
                f"{path!r} is a pickle that needs globals the safe loader does not allow: "
                f"{', '.join(self.globals)}. {opt_in}"
            )
        elif reason and _RESTRICTED_GETATTR in reason:
            message = (
                f"refusing to load {path!r}: {reason}. mmengine never writes such a reference; "
                "do not load this file unless you wrote it yourself"
            )
        else:
            message = (
                f"{path!r} can not be loaded safely: {reason}. If you trust the file, pass "
                "`weights_only=False` to unpickle it without restrictions"
            )
        super().__init__(message)


class UnsafeLoadWarning(UserWarning):
    """A checkpoint is being unpickled without restrictions (``weights_only=False``)."""
