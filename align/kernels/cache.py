"""Compiled kernels kept between runs, so that only a machine's first run pays for compiling them.

align's compiled RMSNorm / rope / log-softmax, compiled decoder layers and Triton operators compile on first
use (tens of seconds in step 1 at V2-Lite). Triton and inductor already cache on disk, but in places that a
fresh container or another user's ``/tmp`` does not keep; align points both at one directory
(``$ALIGN_KERNEL_CACHE``, default ``~/.cache/align/kernels``) unless the user set theirs, and says in one log
line whether the run starts warm (compiled kernels from earlier runs are there) or cold.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
_DONE: str | None = None


def kernel_cache_dir() -> Path:
    return Path(os.environ.get("ALIGN_KERNEL_CACHE", Path.home() / ".cache" / "align" / "kernels")).expanduser()


def _kernels(root: Path) -> int:
    """Compiled GPU kernels under ``root`` (Triton writes one binary per kernel, inductor's included)."""
    return sum(1 for _ in root.rglob("*.cubin")) + sum(1 for _ in root.rglob("*.hsaco")) if root.is_dir() else 0


def _inductor_default() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return os.path.abspath(default_cache_dir())
    except ImportError:  # pragma: no cover
        return None


def use_kernel_cache() -> str:
    """Point Triton's and inductor's caches at :func:`kernel_cache_dir` (before anything compiles) and log
    warm or cold once; returns the line."""
    global _DONE
    if _DONE is not None:
        return _DONE
    root = kernel_cache_dir()
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    # Importing torch._dynamo already wrote inductor's default (/tmp/torchinductor_<user>) into the environment:
    # that one is not the user's choice, so it is replaced; inductor reads the variable on every use.
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, _inductor_default()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    try:
        import torch._inductor.config as inductor

        inductor.fx_graph_cache = True
        inductor.autotune_local_cache = True
    except ImportError:  # pragma: no cover - every supported torch has inductor
        pass
    dirs = [Path(os.environ["TRITON_CACHE_DIR"]), Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])]
    found = sum(_kernels(d) for d in set(dirs))
    where = os.path.commonpath([str(d) for d in dirs])
    _DONE = (f"kernel cache {where}: warm, {found} compiled kernels from earlier runs (step 1 loads them)" if found
             else f"kernel cache {where}: cold, step 1 compiles align's kernels (later runs reuse them)")
    log.info(_DONE)
    return _DONE
