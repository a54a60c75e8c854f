"""Hostile battery: each program is contained and leaves no process and no file behind."""

import os
import socket
import threading
import time
import uuid

import pytest

from rewards.sandbox import UID_BASE, Limits, Sandbox, _pids_of, isolation

LIMITS = Limits(timeout_s=2.0, cpu_s=2, memory_mb=256)


@pytest.fixture(scope="module")
def box():
    return Sandbox(LIMITS, workers=2)


def _no_leftovers():
    if isolation()["separate_uid"]:
        for uid in (UID_BASE, UID_BASE + 1):
            assert _pids_of(uid) == [], f"surviving processes of sandbox uid {uid}"


def test_isolation_is_reported_and_active_here():
    info = isolation()
    assert set(info) >= {"network_namespace", "separate_uid", "rlimits"}
    if os.geteuid() == 0:
        assert info["network_namespace"] and info["separate_uid"]


def test_plain_program_runs(box):
    res = box.run("print(int(input()) + 1)", stdin="41")
    assert res.status == "ok" and res.stdout.strip() == "42"


def test_fork_bomb(box):
    t = time.monotonic()
    res = box.run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    assert res.status in ("timeout", "error") and time.monotonic() - t < 10
    _no_leftovers()


def test_memory_bomb(box):
    res = box.run("x = bytearray(2 * 1024**3)\nprint('allocated')")
    assert res.status == "error" and "allocated" not in res.stdout and "MemoryError" in res.stderr


@pytest.mark.parametrize("program", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"])
def test_infinite_loop_and_sleep_are_killed_on_time(box, program):
    t = time.monotonic()
    res = box.run(program)
    assert res.status == "timeout" and time.monotonic() - t < LIMITS.timeout_s + 3
    _no_leftovers()


def test_no_network_even_to_localhost(box):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(3)
    port = srv.getsockname()[1]
    accepted = []
    th = threading.Thread(target=lambda: accepted.append(_accept(srv)))
    th.start()
    res = box.run(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')")
    th.join()
    srv.close()
    assert "connected" not in res.stdout and accepted == [None]


def _accept(srv):
    try:
        return srv.accept()
    except OSError:
        return None


def test_cannot_write_outside_its_dir(box):
    name = f"/tmp/align-escape-{uuid.uuid4().hex}"
    res = box.run(f"open({name!r}, 'w').write('x')\ntry:\n    open('/root/escape', 'w')\nexcept OSError as e:\n    print('denied')")
    assert not os.path.exists(name) and not os.path.exists("/root/escape")
    if isolation()["separate_uid"]:
        assert "denied" in res.stdout


def test_cannot_read_parent_secret(box, monkeypatch):
    monkeypatch.setenv("ALIGN_TEST_SECRET", "s3cret-value")
    res = box.run("import os\nprint(os.environ.get('ALIGN_TEST_SECRET'))\nprint(open('/proc/%d/environ' % os.getppid(), 'rb').read())")
    assert "s3cret-value" not in res.stdout + res.stderr


def test_cannot_kill_parent(box):
    res = box.run(f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)")
    assert res.status == "error"  # we are still here to assert it


def test_huge_output_is_capped(box):
    res = box.run("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 1_000_000)\n")
    assert len(res.stdout) <= LIMITS.output_bytes


def test_daemonized_grandchild_is_reaped(box):
    marker = f"/tmp/align-daemon-{uuid.uuid4().hex}"
    prog = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        time.sleep(1.5)\n        open({marker!r}, 'w').write('alive')\n        time.sleep(30)\n"
            "    os._exit(0)\nprint('parent done')\n")
    res = box.run(prog)
    assert res.status == "ok"
    _no_leftovers()
    time.sleep(2)
    assert not os.path.exists(marker)
