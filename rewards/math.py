"""Math verifier: extract the final answer, check it against the gold answer with math-verify."""

from __future__ import annotations

import logging
import re

from rewards.base import register_reward

MAX_CHARS = 4000
logging.getLogger("math_verify").setLevel(logging.ERROR)
_ANSWER_IS = re.compile(r"answer is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.\s*)?$", re.IGNORECASE | re.MULTILINE)
_HASHES = re.compile(r"####\s*([^\n]+)")


def _last_boxed_at(text: str) -> tuple[int, str | None]:
    """(start, content) of the last ``\\boxed{...}`` / ``\\fbox{...}``, nested braces included; (-1, None) if none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return -1, None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return (start, text[i:j - 1]) if depth == 0 else (-1, None)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox``), nested braces included.

    >>> last_boxed(r"so \\boxed{\\frac{1}{2}} and finally \\boxed{\\frac{3}{4}}")
    '\\\\frac{3}{4}'
    """
    return _last_boxed_at(text)[1]


def extract_answer(text: str) -> str | None:
    """The last final answer the completion states, whichever marker states it: ``\\boxed{x}``, ``#### x`` or
    "the answer is x" (a policy that states two answers is graded on its last word, never on its best one).

    >>> extract_answer("3+4=7\\n#### 7")
    '7'
    >>> extract_answer("So the answer is 12.")
    '12'
    >>> extract_answer("#### 72\\nActually the answer is 73")
    '73'
    >>> extract_answer("the answer is 5, so \\\\boxed{6}\\n#### 7")
    '7'
    >>> extract_answer("no idea") is None
    True
    """
    text = text[-MAX_CHARS:]
    found: list[tuple[int, str]] = []
    at, boxed = _last_boxed_at(text)
    if boxed is not None:
        found.append((at, boxed.strip()))
    hashes = list(_HASHES.finditer(text))
    if hashes:
        found.append((hashes[-1].start(), hashes[-1].group(1).strip()))
    said = list(_ANSWER_IS.finditer(text))
    if said:
        found.append((said[-1].start(), said[-1].group(1).strip().rstrip(".")))
    return max(found)[1] if found else None


def gold_answer(gold) -> str | None:
    """Gold column to an answer string: GSM8K's worked solutions end in ``#### x``; MATH's in ``\\boxed``."""
    if gold is None:
        return None
    text = str(gold)
    if "####" in text:
        return text.split("####")[-1].strip()
    boxed = last_boxed(text)
    return (boxed if boxed is not None else text).strip() or None


def _clean(ans: str) -> str:
    ans = ans.strip().strip("$").strip()
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", ans)


@register_reward("math", columns=("answer",))
def verify_one(completion: str, answer) -> tuple[float | None, str]:
    """(score, reason) for one completion; score None when the gold answer cannot be parsed."""
    from math_verify import parse, verify

    g = gold_answer(answer)
    if g is None:
        return None, "no gold answer"
    gold_parsed = parse(f"${_clean(g)}$", parsing_timeout=None)
    if not gold_parsed:
        return None, f"unparseable gold {g[:40]!r}"
    pred = extract_answer(completion)
    if pred is None:
        return 0.0, "no final answer"
    if len(pred) > 500:
        return 0.0, "answer too long"
    pred_parsed = parse(f"\\boxed{{{_clean(pred)}}}", parsing_timeout=None)
    if not pred_parsed:
        return 0.0, f"unparseable answer {pred[:40]!r}"
    ok = verify(gold_parsed, pred_parsed, timeout_seconds=None)
    return (1.0 if ok else 0.0), ("correct" if ok else f"wrong: {pred[:40]!r}")
