"""The reward registry: look rewards up by name, combine them with weights, configure how they run."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from rewards.base import REGISTRY, SETTINGS, Reward, completion_text, register_reward  # noqa: F401 (re-exported)
from rewards.sandbox import SandboxUnavailable

log = logging.getLogger(__name__)


def configure(timeout_s: float | None = None, workers: int | None = None,
              allow_unisolated_code: bool | None = None) -> None:
    """Set the per-sample time limit and worker count used by isolated rewards (and the code sandbox), and
    whether the code reward may run candidates without isolation."""
    from rewards import code

    if timeout_s is not None:
        SETTINGS["timeout_s"] = timeout_s
        code.SETTINGS["limits"].timeout_s = timeout_s
    if workers is not None:
        SETTINGS["workers"] = workers
        code.SETTINGS["workers"] = 2 * workers if workers else 0
    if allow_unisolated_code is not None:
        code.SETTINGS["allow_unisolated"] = allow_unisolated_code


def get_reward(name: str) -> Reward:
    """The registered reward ``name`` (math, code, format, …).

    >>> get_reward("math")(["3+4=7\\n#### 7", "#### 8"], answer=["7", "7"])
    [1.0, 0.0]
    """
    _load_builtins()
    if name not in REGISTRY and "." in name:
        REGISTRY[name] = _imported(name)
    if name not in REGISTRY:
        raise KeyError(f"unknown reward {name!r}; known: {', '.join(sorted(REGISTRY))} "
                       "(or a dotted path to your own function, e.g. my_pkg.rewards.length_penalty)")
    return REGISTRY[name]


def _imported(path: str) -> Reward:
    """A user's reward by dotted path, with TRL's signature ``fn(completions, **columns) -> list[float | None]``
    (``prompts`` and ``completion_ids`` are not passed). The columns it reads are its named parameters."""
    import importlib
    import inspect

    module, _, attr = path.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise KeyError(f"reward {path!r}: cannot import it ({e})") from None
    params = inspect.signature(fn).parameters
    skip = {"completions", "prompts", "completion_ids", "trainer_state"}
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    columns = tuple(n for n, p in params.items() if n not in skip and p.kind in named)

    def batch(completions: list[str], rows: list[dict]) -> list[tuple[float | None, str]]:
        cols = {c: [r.get(c) for r in rows] for c in columns}
        scores = list(fn(completions=completions, **cols))
        if len(scores) != len(completions):
            raise ValueError(f"reward {path!r} returned {len(scores)} scores for {len(completions)} completions")
        return [(None if v is None else float(v), path) for v in scores]

    return Reward(path, lambda c, **k: batch([c], [k])[0], columns, isolated=False, batch=batch,
                  optional=columns)


def list_rewards() -> list[str]:
    _load_builtins()
    return sorted(REGISTRY)


@functools.cache
def _load_builtins() -> None:
    from rewards import code, format, math  # noqa: F401  (each registers itself)


@dataclass
class Combined:
    """Weighted sum of several rewards; unscorable in any -> unscorable in total."""

    weights: dict[str, float]

    @property
    def columns(self) -> tuple[str, ...]:
        """The dataset columns these rewards read (each reward's declared ones): what callers pass to :meth:`score`.

        >>> Combined({"math": 1.0, "format": 0.5}).columns
        ('answer', 'pattern')
        """
        return tuple(dict.fromkeys(c for name in self.weights for c in get_reward(name).columns))

    def preflight(self) -> None:
        """Fail now, not mid-training, if a reward cannot run on this machine."""
        for name in self.weights:
            check = get_reward(name).preflight
            if check is not None:
                check()

    def score(self, completions: list[str], **columns) -> tuple[list[float | None], dict[str, list], dict[str, list]]:
        per: dict[str, list] = {}
        reasons: dict[str, list] = {}
        for name in self.weights:
            try:
                detail = get_reward(name).detailed(completions, **columns)
            except (KeyError, SandboxUnavailable):
                raise
            except Exception as e:  # a crashing verifier must not kill training: score 0, log
                log.warning("reward %r raised %s: %s; scoring this batch 0 for it", name, type(e).__name__, e)
                detail = [(0.0, f"reward error: {type(e).__name__}: {e}")] * len(completions)
            per[name] = [s for s, _ in detail]
            reasons[name] = [r for _, r in detail]
        total = []
        for i in range(len(completions)):
            vals = [per[n][i] for n in self.weights]
            weighted = None if any(v is None for v in vals) else sum(w * v for w, v in zip(self.weights.values(), vals))
            total.append(weighted)
        return total, per, reasons
