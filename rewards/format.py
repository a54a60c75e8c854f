"""Format reward: does the response follow the required shape (reasoning, then a final answer)?"""

from __future__ import annotations

import re

DEFAULT_PATTERN = r"(?s)\S.*?(####\s*\S+|\\boxed\{.+\})\s*"


def format_one(completion: str, pattern: str = DEFAULT_PATTERN) -> tuple[float, str]:
    """1.0 when the whole completion matches ``pattern`` (a full-match regex).

    >>> format_one("3+4=7\\n#### 7")
    (1.0, 'ok')
    >>> format_one("7")
    (0.0, 'format mismatch')
    """
    ok = re.fullmatch(pattern, completion.strip()) is not None
    return (1.0, "ok") if ok else (0.0, "format mismatch")
