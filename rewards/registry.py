"""Reward registry. Every reward has TRL's batch signature ``fn(completions, **columns) -> list[float | None]``.

``None`` means the sample cannot be scored (e.g. an unparseable gold answer): it is excluded from
training and counted, never silently given 1.0.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable

from rewards.pool import TimeoutPool
from rewards.sandbox import SandboxUnavailable

log = logging.getLogger(__name__)
Scorer = Callable[..., "tuple[float | None, str]"]
_REGISTRY: dict[str, "Reward"] = {}
_POOLS: dict[tuple, TimeoutPool] = {}
SETTINGS = {"timeout_s": 5.0, "workers": 0}


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


def _pool(scorer: Scorer) -> TimeoutPool:
    key = (scorer, SETTINGS["timeout_s"], SETTINGS["workers"])
    if key not in _POOLS:
        _POOLS[key] = TimeoutPool(_call, workers=SETTINGS["workers"], timeout_s=SETTINGS["timeout_s"])
    return _POOLS[key]


def _call(scorer: Scorer, completion: str, columns: dict):
    return scorer(completion, **columns)


def completion_text(completion) -> str:
    """A completion as text: a string, or TRL's conversational form (a list of messages; the last one's content).

    >>> completion_text([{"role": "assistant", "content": "#### 7"}])
    '#### 7'
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict) \
            and isinstance(completion[-1].get("content"), str):
        return completion[-1]["content"]
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}: "
                    f"{str(completion)[:60]!r}")


@dataclass
class Reward:
    """A named reward: a per-sample scorer, the dataset columns it reads, how it runs."""

    name: str
    scorer: Scorer
    columns: tuple[str, ...]
    isolated: bool = True
    """Run each sample in a killable worker process with the time limit."""
    batch: Callable | None = None
    """Optional whole-batch implementation (e.g. the sandbox pool); overrides per-sample calls."""
    optional: tuple[str, ...] = ()
    """Columns passed when present; their absence is not an error."""
    preflight: Callable | None = None
    """Called before training starts: raises if the reward cannot run here (e.g. no sandbox isolation)."""

    def detailed(self, completions: list, **columns) -> list[tuple[float | None, str]]:
        completions = [completion_text(c) for c in completions]
        rows = [{c: columns[c][i] for c in self.columns if c in columns} for i in range(len(completions))]
        missing = [c for c in self.columns if c not in columns and c not in self.optional]
        if missing:
            raise KeyError(f"reward {self.name!r} needs dataset column(s) {missing}")
        if self.batch is not None:
            return self.batch(completions, rows)
        if not self.isolated:
            return [self.scorer(c, **r) for c, r in zip(completions, rows)]
        out = _pool(self.scorer).map([(self.scorer, c, r) for c, r in zip(completions, rows)])
        return [v if ok else (0.0, f"verifier {v}") for ok, v in out]

    def __call__(self, completions: list[str], **columns) -> list[float | None]:
        return [s for s, _ in self.detailed(completions, **columns)]


def register_reward(name: str, columns: tuple[str, ...] = (), isolated: bool = True,
                    optional: tuple[str, ...] = (), batch: Callable | None = None, preflight: Callable | None = None):
    def deco(scorer: Scorer) -> Scorer:
        _REGISTRY[name] = Reward(name, scorer, columns + optional, isolated, batch, optional, preflight)
        return scorer
    return deco


def get_reward(name: str) -> Reward:
    """The registered reward ``name`` (math, code, format, …).

    >>> get_reward("math")(["3+4=7\\n#### 7", "#### 8"], answer=["7", "7"])
    [1.0, 0.0]
    """
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_rewards() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


@functools.cache
def _load_builtins() -> None:
    from rewards import code, format as fmt, math as m  # noqa: F401  (registration side effects)

    register_reward("math", columns=("answer",))(m.verify_one)
    register_reward("format", isolated=False, optional=("pattern",))(_format)
    code.register()


def _format(completion: str, pattern: str | None = None):
    from rewards.format import DEFAULT_PATTERN, format_one

    return format_one(completion, pattern or DEFAULT_PATTERN)


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
            total.append(None if any(v is None for v in vals) else sum(w * v for w, v in zip(self.weights.values(), vals)))
        return total, per, reasons
