"""Code reward: run a completion against tests in the sandbox; reward = pass fraction (or all-or-nothing).

Test formats, by which columns a row has:
- HumanEval: ``prompt`` (signature + docstring), ``test`` (defines ``check``), ``entry_point``. The completion
  may continue ``prompt`` (HumanEval style) or be a whole solution, fenced or not.
- MBPP: ``tests`` — a list of ``assert`` lines, each counted separately.
- stdin/stdout: ``cases`` — a list of {input, output}; each case is its own sandboxed run.

Tests run in the candidate's process, so the result line carries a nonce the candidate never sees
in its namespace, builtins are restored before the tests run, and ``SystemExit`` inside the
candidate or a test counts as a failure, never a pass.
"""

from __future__ import annotations

import json
import re
import secrets
from concurrent.futures import ThreadPoolExecutor

from rewards.sandbox import Limits, Sandbox

_FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)
SETTINGS = {"all_or_nothing": False, "limits": Limits(), "workers": 0}
_SANDBOX: Sandbox | None = None

HARNESS = r'''
import os as _os, sys as _sys, builtins as _b
def _run(_os=_os, _b=_b, _snap=dict(_b.__dict__), _w=_os.write, _dup=_os.dup(1)):
    _fd = int(_sys.argv[1])
    _tag = _os.read(_fd, 128)
    _os.close(_fd)
    _spec = __SPEC__
    _ns = {"__name__": "__main__"}
    _ok, _total = 0, len(_spec["tests"]) or 1
    try:
        exec(compile(_spec["code"], "solution.py", "exec"), _ns)
        _loaded = True
    except BaseException:
        _loaded = False
    _b.__dict__.clear()
    _b.__dict__.update(_snap)
    if _loaded:
        for _t in _spec["tests"]:
            try:
                exec(compile(_t, "test.py", "exec"), _ns)
                _ok += 1
            except BaseException:
                pass
    _w(_dup, b"\n" + _tag + (" %d %d\n" % (_ok, _total)).encode())
_run()
'''


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
    """What the harness runs: candidate code and test snippets; None when the row has no tests."""
    if test and entry_point:
        return {"code": _humaneval_code(completion, prompt or "", entry_point),
                "tests": [test + f"\ncheck({entry_point})\n"]}
    if tests:
        tests = json.loads(tests) if isinstance(tests, str) else tests
        return {"code": extract_code(completion), "tests": list(tests)}
    return None


def _sandbox() -> Sandbox:
    global _SANDBOX
    if _SANDBOX is None:
        _SANDBOX = Sandbox(SETTINGS["limits"], SETTINGS["workers"])
    return _SANDBOX


def _score_spec(spec: dict) -> tuple[float, str]:
    tag = "ALIGN-RESULT-" + secrets.token_hex(16)
    program = HARNESS.replace("__SPEC__", repr(spec))
    res = _sandbox().run(program, extra_fds={3: tag.encode()})
    if res.status == "timeout":
        return 0.0, "timeout"
    lines = [line for line in res.stdout.splitlines() if line.startswith(tag)]
    if not lines:
        return 0.0, f"no result ({res.status}, rc={res.returncode}): {res.stderr[-200:]}"
    ok, total = map(int, lines[-1].split()[1:3])
    frac = ok / max(total, 1)
    if SETTINGS["all_or_nothing"]:
        frac = float(ok == total)
    return frac, f"passed {ok}/{total}"


def _score_io(completion: str, cases) -> tuple[float, str]:
    cases = json.loads(cases) if isinstance(cases, str) else cases
    code = extract_code(completion)
    ok = 0
    for case in cases:
        res = _sandbox().run(code, stdin=str(case["input"]))
        got = "\n".join(line.rstrip() for line in res.stdout.strip().splitlines())
        want = "\n".join(line.rstrip() for line in str(case["output"]).strip().splitlines())
        ok += res.status == "ok" and got == want
    frac = ok / max(len(cases), 1)
    if SETTINGS["all_or_nothing"]:
        frac = float(ok == len(cases))
    return frac, f"passed {ok}/{len(cases)}"


def score_one(completion: str, prompt=None, test=None, entry_point=None, tests=None, cases=None,
              prompt_text=None) -> tuple[float | None, str]:
    """(pass fraction, reason) for one completion; None when the row carries no tests."""
    if cases:
        return _score_io(completion, cases)
    spec = build_spec(completion, prompt_text if isinstance(prompt_text, str) else prompt, test, entry_point, tests)
    if spec is None:
        return None, "no tests in row"
    return _score_spec(spec)


def score_batch(completions: list[str], rows: list[dict]) -> list[tuple[float | None, str]]:
    """Score concurrently; the sandbox bounds concurrency by its uid slots."""
    with ThreadPoolExecutor(max_workers=_sandbox().workers) as pool:
        return list(pool.map(lambda cr: score_one(cr[0], **cr[1]), zip(completions, rows)))


def register() -> None:
    from rewards.registry import register_reward

    register_reward("code", optional=("prompt", "test", "entry_point", "tests", "cases", "prompt_text"),
                    batch=score_batch)(score_one)
