"""Format reward: does the response follow the required shape (reasoning, then a final answer)?"""

from __future__ import annotations

import re

from rewards.base import register_reward

DEFAULT_PATTERN = r"(?s)\S.*?(####\s*\S+|\\boxed\{.+\})\s*"
MAX_CHARS = 16_000
"""Longer completions do not match: a custom pattern runs in the trainer's process, so its input is bounded."""


def _default_shape(text: str) -> bool:
    """:data:`DEFAULT_PATTERN` in one linear pass (the regex is quadratic on an unclosed ``\\boxed{``): something,
    then ``#### <one token>`` or a closed ``\\boxed{...}`` that ends the text."""
    hashes = text.rfind("####")
    if hashes >= 1:
        tail = text[hashes + 4:].split()
        if len(tail) == 1:
            return True
    boxed = text.find("\\boxed{", 1)
    return boxed >= 1 and text.endswith("}") and len(text) - 1 > boxed + len("\\boxed{")


def format_one(completion: str, pattern: str = DEFAULT_PATTERN) -> tuple[float, str]:
    """1.0 when the whole completion matches ``pattern`` (a full-match regex).

    >>> format_one("3+4=7\\n#### 7")
    (1.0, 'ok')
    >>> format_one("7")
    (0.0, 'format mismatch')
    """
    text = completion.strip()
    if len(text) > MAX_CHARS:
        return 0.0, "too long to check"
    ok = _default_shape(text) if pattern == DEFAULT_PATTERN else re.fullmatch(pattern, text) is not None
    return (1.0, "ok") if ok else (0.0, "format mismatch")


@register_reward("format", isolated=False, optional=("pattern",))
def _format(completion: str, pattern: str | None = None):
    return format_one(completion, pattern or DEFAULT_PATTERN)
