"""Verifier throughput on this machine: math verifications/s and sandboxed code executions/s, p50/p99.

    python bench/rewards.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import percentiles, write  # noqa: E402
from rewards import get_reward  # noqa: E402
from rewards.sandbox import Limits, Sandbox, isolation  # noqa: E402


def main() -> None:
    math = get_reward("math")
    comps = [f"step\n#### {i}" if i % 3 else f"so \\boxed{{\\frac{{{i}}}{{2}}}}" for i in range(2000)]
    golds = [str(i) if i % 3 else f"{i / 2}" for i in range(2000)]
    math(comps[:10], answer=golds[:10])
    t = time.perf_counter()
    math(comps, answer=golds)
    math_batch = time.perf_counter() - t
    lat = []
    for c, g in zip(comps[:200], golds[:200]):
        t = time.perf_counter()
        math([c], answer=[g])
        lat.append(time.perf_counter() - t)
    box = Sandbox(Limits(timeout_s=5))
    prog = "def f(x):\n    return x * 2\nassert f(3) == 6\nprint('ok')\n"
    box.run(prog)
    code_lat = []
    for _ in range(40):
        t = time.perf_counter()
        box.run(prog)
        code_lat.append(time.perf_counter() - t)
    code = get_reward("code")
    n = 64
    t = time.perf_counter()
    code(["def sq(x):\n    return x*x\n"] * n, tests=[["assert sq(3) == 9", "assert sq(2) == 4"]] * n)
    code_batch = time.perf_counter() - t
    write("rewards_cpu", {
        "math": {"verifications_per_s_batch": len(comps) / math_batch, "single_call_latency": percentiles(lat)},
        "code": {"executions_per_s_batch": n / code_batch, "single_run_latency": percentiles(code_lat),
                 "workers": box.workers, "isolation": isolation()},
    })


if __name__ == "__main__":
    main()
