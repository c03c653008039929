"""`import ckptmap` without torch: the key rules, the key index and the error classes work (the
tests in tests/core/ rely on it under every supported Python); everything else says it needs
torch. A child interpreter blocks torch even where it is installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # as if torch were not installed
    import ckptmap
    from ckptmap import KeyRules, diff_keys, filter_prefix, CheckpointNotFoundError
    assert KeyRules([(r"^module\\.", "")]).apply(["module.a"]) == ["a"]
    assert list(filter_prefix({"backbone.w": 1, "head.b": 2}, "backbone")) == ["w"]
    assert diff_keys(["a"], ["b"]) == (["b"], ["a"])
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)
    for name in ("load_checkpoint", "save_checkpoint", "CheckpointLoader"):
        try:
            getattr(ckptmap, name)
        except ModuleNotFoundError as err:
            assert err.name == "torch" and f"ckptmap.{name} needs PyTorch" in str(err), err
        else:
            raise AssertionError(name)
    try:
        ckptmap.no_such_name
    except AttributeError:
        pass
    assert sys.modules["torch"] is None
    print("ok")
    """
)


def test_torch_free_surface() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n"
