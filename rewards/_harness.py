"""The trusted side of a test run: dataset test code calls the candidate's functions through :class:`Remote`.

Runs in its own process (another uid than the candidate, not dumpable): the candidate cannot read its memory,
its frames, the test source or the pass count. Each call's arguments and result cross as plain data
(:mod:`rewards._wire`). Stdlib only.
"""

from __future__ import annotations

import _wire


class CandidateError(Exception):
    """The candidate's function raised, returned something that is not plain data, or its process is gone."""


class Channel:
    def __init__(self, rx, tx):
        self.rx, self.tx, self.dead = rx, tx, False

    def hello(self) -> dict:
        msg = self._receive()
        return msg if isinstance(msg, dict) else {"error": "no greeting"}

    def _receive(self):
        try:
            msg = _wire.receive(self.rx)
        except Exception:  # oversized, malformed or undecodable: this call fails
            msg = None
        if msg is None:
            self.dead = True
        return msg

    def call(self, name: str, args: tuple, kwargs: dict):
        if self.dead:
            raise CandidateError("candidate process ended")
        try:
            _wire.send(self.tx, {"f": name, "a": _wire.encode(tuple(args)), "k": _wire.encode(dict(kwargs))})
        except (OSError, ValueError, TypeError) as e:
            raise CandidateError(f"cannot send arguments: {e}") from None
        msg = self._receive()
        if type(msg) is not dict:
            raise CandidateError("no answer")
        if "r" in msg:
            try:
                return _wire.decode(msg["r"])
            except Exception:
                raise CandidateError("answer is not plain data") from None
        raise CandidateError(f"candidate raised {msg.get('e')!s:.40}")


class Remote:
    """Stands for one of the candidate's functions inside the test code."""

    def __init__(self, channel: Channel, name: str):
        self._channel, self.__name__ = channel, name

    def __call__(self, *args, **kwargs):
        return self._channel.call(self.__name__, args, kwargs)

    def __repr__(self) -> str:
        return f"<candidate function {self.__name__}>"


def run_tests(channel: Channel, spec: dict, report) -> None:
    """``spec``: ``setup`` (trusted code run first, e.g. a HumanEval prompt's helpers), ``remote`` (names bound
    to the candidate; ``None``: every callable it defines), ``tests`` (snippets, each one pass or fail).
    ``report(ok)`` is called once per test as it finishes."""
    hello = channel.hello()
    ns: dict = {"__name__": "__main__"}
    loaded = "names" in hello and isinstance(hello["names"], list)
    if loaded:
        try:
            exec(compile(spec.get("setup") or "", "setup.py", "exec"), ns)
        except BaseException:  # noqa: BLE001 - a broken prompt fails every test, the same for every sample
            loaded = False
    names = spec.get("remote")
    names = [n for n in hello.get("names", []) if isinstance(n, str)] if names is None else names
    for n in names if loaded else ():
        ns[n] = Remote(channel, n)
    for test in spec["tests"]:
        ok = False
        if loaded:
            try:
                exec(compile(test, "test.py", "exec"), ns)
                ok = True
            except BaseException:  # noqa: BLE001 - any failure of a test is that test failing
                ok = False
        report(ok)
