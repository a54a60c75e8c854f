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
