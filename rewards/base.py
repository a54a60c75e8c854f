"""What a reward is and how it registers: every reward module registers itself here at import.

Every reward has TRL's batch signature ``fn(completions, **columns) -> list[float | None]``. ``None`` means the
sample cannot be scored (e.g. an unparseable gold answer): it is excluded from training and counted, never
silently given 1.0. To add one: write ``scorer(completion, **columns) -> (score, reason)`` in its own module,
decorate it with ``@register_reward("name", columns=(...))`` and import the module in
:func:`rewards.registry._load_builtins`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from rewards.pool import TimeoutPool

log = logging.getLogger(__name__)
Scorer = Callable[..., "tuple[float | None, str]"]
REGISTRY: dict[str, "Reward"] = {}
_POOLS: dict[tuple, TimeoutPool] = {}
SETTINGS = {"timeout_s": 5.0, "workers": 0}


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
        REGISTRY[name] = Reward(name, scorer, columns + optional, isolated, batch, optional, preflight)
        return scorer
    return deco


