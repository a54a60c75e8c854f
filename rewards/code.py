"""Code reward: run a completion against tests in the sandbox; reward = pass fraction (or all-or-nothing).

Test formats, by which columns a row has:
- HumanEval: ``prompt`` (signature + docstring), ``test`` (defines ``check``), ``entry_point``. The completion
  may continue ``prompt`` (HumanEval style) or be a whole solution, fenced or not.
- MBPP: ``tests`` — a list of ``assert`` lines, each counted separately.
- stdin/stdout: ``cases`` — a list of {input, output}; each case is its own sandboxed run.

No test runs in the candidate's process: the candidate only loads its code and answers calls; the tests run in
a trusted harness process (another uid, out of the candidate's reach) that counts the passes, and every value
crosses as plain data, so no candidate object reaches ``==`` (``rewards.sandbox``). A HumanEval prompt's own
helpers (``poly`` beside ``find_zero``) come from the dataset, not from the candidate. stdin/stdout outputs are
compared here, outside the candidate. A run the sandbox could not set up is unscorable (``None``), never 0.
"""

from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor

from rewards.base import register_reward
from rewards.sandbox import Limits, RunResult, Sandbox

log = logging.getLogger(__name__)
_FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)
SETTINGS = {"all_or_nothing": False, "limits": Limits(), "workers": 0, "allow_unisolated": False}
_SANDBOX: Sandbox | None = None


def extract_code(completion: str) -> str:
    """The last fenced code block, else the completion itself.

    >>> extract_code("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nDone.")
    'def f():\\n    return 1\\n'
    """
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def _humaneval_code(completion: str, prompt: str, entry_point: str) -> str:
    code = extract_code(completion)
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        header = "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))
        return header + "\n" + code
    return prompt + code


def build_spec(completion: str, prompt=None, test=None, entry_point=None, tests=None) -> dict | None:
    """What a test run needs: candidate ``code``, trusted ``setup``, the ``remote`` names bound to the candidate
    (``None``: every function it defines) and the test snippets; ``None`` when the row has no tests."""
    if test and entry_point:
        return {"code": _humaneval_code(completion, prompt or "", entry_point), "setup": prompt or "",
                "remote": [entry_point], "tests": [test + f"\ncheck({entry_point})\n"]}
    if tests:
        tests = json.loads(tests) if isinstance(tests, str) else tests
        return {"code": extract_code(completion), "setup": "", "remote": None, "tests": list(tests)}
    return None


def _sandbox() -> Sandbox:
    global _SANDBOX
    if _SANDBOX is None:
        # Twice the cores: each run waits on two interpreter start-ups (HumanEval on 2 cores: 37.8 runs/s with
        # 2 at a time, 45.5 with 4, 46.4 with 6; bench/rewards.py).
        workers = SETTINGS["workers"] or 2 * (os.cpu_count() or 1)
        _SANDBOX = Sandbox(SETTINGS["limits"], workers, require_isolation=not SETTINGS["allow_unisolated"])
    return _SANDBOX


def _fraction(ok: int, total: int) -> float:
    if SETTINGS["all_or_nothing"]:
        return float(ok == total)
    return ok / max(total, 1)


def _score_spec(spec: dict) -> tuple[float | None, str]:
    res = _sandbox().run_tests(spec["code"], spec["tests"], spec["setup"], spec["remote"])
    if res.status == "setup-error":
        return None, f"sandbox set-up failed: {res.stderr or res.extra.get('setup_error')}"[:200]
    ok, total = res.extra["passed"], res.extra["total"]
    note = "" if res.status == "ok" else f" ({res.status})"
    return _fraction(ok, total), f"passed {ok}/{total}{note}"


def _same_output(res: RunResult, expected) -> bool:
    got = "\n".join(line.rstrip() for line in res.stdout.strip().splitlines())
    want = "\n".join(line.rstrip() for line in str(expected).strip().splitlines())
    return res.status == "ok" and got == want


def _score_io(completion: str, cases) -> tuple[float | None, str]:
    cases = json.loads(cases) if isinstance(cases, str) else cases
    code = extract_code(completion)
    results = [_sandbox().run(code, stdin=str(case["input"])) for case in cases]
    if any(r.status == "setup-error" for r in results):
        return None, "sandbox set-up failed"
    ok = sum(_same_output(r, case["output"]) for r, case in zip(results, cases))
    return _fraction(ok, len(cases)), f"passed {ok}/{len(cases)}"


def score_one(completion: str, prompt=None, test=None, entry_point=None, tests=None, cases=None,
              prompt_text=None) -> tuple[float | None, str]:
    """(pass fraction, reason) for one completion; None when the row carries no tests."""
    if cases:
        return _score_io(completion, cases)
    spec = build_spec(completion, prompt_text if isinstance(prompt_text, str) else prompt, test, entry_point, tests)
    if spec is None:
        return None, "no tests in row"
    return _score_spec(spec)


def _guarded(completion: str, row: dict) -> tuple[float | None, str]:
    """One sample's failure stays that sample's: an error here makes it unscorable, never the batch 0."""
    try:
        return score_one(completion, **row)
    except (KeyError, TypeError, ValueError) as e:
        return None, f"bad test row: {type(e).__name__}: {e}"[:200]


def score_batch(completions: list[str], rows: list[dict]) -> list[tuple[float | None, str]]:
    """Score concurrently; the sandbox bounds concurrency by its uid slots."""
    box = _sandbox()  # fails here, once, when isolation is required and missing
    with ThreadPoolExecutor(max_workers=box.workers) as pool:
        return list(pool.map(lambda cr: _guarded(cr[0], cr[1]), zip(completions, rows)))


register_reward("code", optional=("prompt", "test", "entry_point", "tests", "cases", "prompt_text"),
                batch=score_batch, preflight=_sandbox)(score_one)
