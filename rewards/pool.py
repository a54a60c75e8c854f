"""A process pool whose tasks each have a hard deadline: an overdue worker is killed and replaced.

math-verify's own timeouts rely on SIGALRM, which cannot interrupt C-level work such as
``9**9**9**9`` inside sympy; killing the worker process can.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from multiprocessing.connection import wait
from typing import Any, Callable


def _exit_with(parent_pid: int) -> None:
    """A worker outlives a killed trainer otherwise: every forked worker holds copies of the pipes, so
    no read ever sees end-of-file. Poll the parent instead."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


def _worker(conn, fn, parent_pid: int) -> None:
    # Ctrl-C reaches the whole process group: the trainer handles it; workers just end with it (no tracebacks).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent_pid,), daemon=True).start()
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        idx, args = item
        try:
            conn.send((idx, True, fn(*args)))
        except BaseException as e:  # the caller decides what a failure scores
            conn.send((idx, False, f"{type(e).__name__}: {e}"))


class TimeoutPool:
    """``map(args_list)`` -> list of (ok, result_or_error); a task past ``timeout_s`` gives (False, 'timeout')."""

    def __init__(self, fn: Callable, workers: int = 0, timeout_s: float = 5.0):
        self.fn = fn
        self.size = workers or os.cpu_count() or 1
        self.timeout_s = timeout_s
        self.ctx = mp.get_context("fork")
        self.procs: list = []

    def _spawn(self):
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(child, self.fn, os.getpid()), daemon=True)
        proc.start()
        child.close()
        return [proc, parent, None, 0.0]

    def _ensure(self) -> None:
        self.procs = [w for w in self.procs if w[0].is_alive()]
        while len(self.procs) < self.size:
            self.procs.append(self._spawn())

    def map(self, args_list: list[tuple]) -> list[tuple[bool, Any]]:
        self._ensure()
        results: list[tuple[bool, Any] | None] = [None] * len(args_list)
        todo = list(enumerate(args_list))[::-1]
        while todo or any(w[2] is not None for w in self.procs):
            for w in self.procs:
                if w[2] is None and todo:
                    idx, args = todo.pop()
                    w[1].send((idx, args))
                    w[2], w[3] = idx, time.monotonic() + self.timeout_s
            busy = [w for w in self.procs if w[2] is not None]
            deadline = min(w[3] for w in busy)
            ready = wait([w[1] for w in busy], timeout=max(0.0, deadline - time.monotonic()))
            for w in busy:
                if w[1] in ready:
                    try:
                        idx, ok, value = w[1].recv()
                        results[idx] = (ok, value)
                        w[2] = None
                        continue
                    except (EOFError, OSError):
                        results[w[2]] = (False, "worker died")
                elif time.monotonic() < w[3]:
                    continue
                else:
                    results[w[2]] = (False, "timeout")
                w[0].kill()
                w[0].join()
                self.procs[self.procs.index(w)] = self._spawn()
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for proc, conn, _, _ in self.procs:
            try:
                conn.send(None)
            except OSError:
                pass
            proc.join(timeout=1)
            if proc.is_alive():
                proc.kill()
        self.procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
