import time

from rewards.pool import TimeoutPool


def _work(x):
    if x == "hang":
        while True:
            pass
    if x == "boom":
        raise ValueError("bad")
    return x * 2


def test_pool_kills_overdue_and_keeps_order():
    with TimeoutPool(_work, workers=2, timeout_s=1.0) as pool:
        t = time.monotonic()
        out = pool.map([(1,), ("hang",), (3,), ("boom",), (5,)])
        assert time.monotonic() - t < 5
    assert out[0] == (True, 2) and out[1] == (False, "timeout") and out[2] == (True, 6)
    assert out[3][0] is False and "ValueError" in out[3][1] and out[4] == (True, 10)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line for line in f)  # a zombie has exited
    except FileNotFoundError:
        return True


def test_workers_exit_when_the_trainer_is_killed():
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("from rewards.pool import TimeoutPool; import time\n"
            "p = TimeoutPool(abs, workers=2); p.map([(-1,)])\n"
            "print(' '.join(str(w[0].pid) for w in p.procs), flush=True); time.sleep(120)")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2 and not any(_gone(p) for p in pids)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.2)
    assert all(_gone(p) for p in pids), "reward workers outlived the killed trainer"
