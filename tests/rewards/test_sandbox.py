"""Hostile programs against the sandbox: each is contained and leaves no process, file or IPC object behind."""

import os
import socket
import threading
import time
import uuid

import pytest

from rewards import sandbox as sbx
from rewards.sandbox import Limits, Sandbox, SandboxUnavailable, isolation

LIMITS = Limits(timeout_s=2.0, cpu_s=2, memory_mb=256)
ISOLATED = os.geteuid() == 0 and isolation()["namespaces"] and isolation()["cgroup"] is not None
pytestmark = pytest.mark.skipif(not ISOLATED, reason="needs root, namespaces and cgroups (CI and dev machines)")


@pytest.fixture(scope="module")
def box():
    return Sandbox(LIMITS, workers=2)


def _uid_processes(uids) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and os.stat(f"/proc/{d}").st_uid in uids:
                out.append(int(d))
        except OSError:
            pass
    return out


def _sysv_shm() -> int:
    with open("/proc/sysvipc/shm") as fh:
        return len(fh.readlines())


def test_isolation_is_complete_here():
    info = isolation()
    assert info["namespaces"] and info["separate_uid"] and info["cgroup"] in ("v1", "v2")


def test_plain_program_runs(box):
    res = box.run("print(int(input()) + 1)", stdin="41")
    assert res.status == "ok" and res.stdout.strip() == "42"


def test_fork_bomb(box):
    t = time.monotonic()
    res = box.run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    assert res.status in ("timeout", "error") and time.monotonic() - t < 10
    assert _uid_processes(box.uids) == []


def test_memory_bomb(box):
    res = box.run("x = bytearray(2 * 1024**3)\nprint('allocated')")
    assert res.status == "error" and "allocated" not in res.stdout and "MemoryError" in res.stderr


def test_memory_is_limited_per_run_not_per_process(box):
    prog = ("import os\nkids = []\nfor _ in range(6):\n    pid = os.fork()\n    if pid == 0:\n"
            "        b = bytearray(120 * 1024**2)\n        b[::4096] = b'x' * len(b[::4096])\n        import time\n"
            "        time.sleep(1)\n        os._exit(0)\n    kids.append(pid)\n"
            "codes = [os.waitpid(k, 0)[1] for k in kids]\nprint('all alive' if not any(codes) else 'killed')\n")
    res = box.run(prog)  # 6 x 120 MB > the run's 256 MB, though each process is under its own limit
    assert "all alive" not in res.stdout


@pytest.mark.parametrize("program", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n",
                                     "import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\n"])
def test_loops_sleeps_and_stops_are_killed_on_time(box, program):
    t = time.monotonic()
    res = box.run(program)
    assert res.status == "timeout" and time.monotonic() - t < LIMITS.timeout_s + 3
    assert _uid_processes(box.uids) == []


def test_stdin_is_fed_under_the_clock(box):
    t = time.monotonic()
    res = box.run("import time\ntime.sleep(60)\n", stdin="x" * (4 << 20))
    assert res.status == "timeout" and time.monotonic() - t < LIMITS.timeout_s + 3
    fast = box.run("print(8)", stdin="y" * (4 << 20))  # never reads its 4 MB of stdin
    assert fast.status == "ok" and fast.stdout.strip() == "8"


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


def test_nothing_it_writes_outlives_the_run(box):
    tag = uuid.uuid4().hex
    shm_before = _sysv_shm()
    prog = ("import os, socket, ctypes\n"
        f"for d in ('/tmp', '/var/tmp', '/dev/shm', '/run/lock'):\n"
        f"    try:\n        open(os.path.join(d, 'align-leak-{tag}'), 'w').write('x')\n    except OSError:\n        pass\n"
        f"s = socket.socket(socket.AF_UNIX)\ns.bind('/tmp/align-sock-{tag}')\n"
        "libc = ctypes.CDLL(None)\nprint('shm', libc.shmget(0, 4096, 0o1666))\n"
        "try:\n    open('/root/escape', 'w')\nexcept OSError:\n    print('denied')\n"
        "try:\n    open('/usr/lib/escape', 'w')\nexcept OSError:\n    print('ro')\n")
    res = box.run(prog)
    assert res.status == "ok" and "denied" in res.stdout and "ro" in res.stdout, res.stderr
    for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
        assert not os.path.exists(os.path.join(d, f"align-leak-{tag}"))
    assert not os.path.exists(f"/tmp/align-sock-{tag}") and not os.path.exists("/root/escape")
    assert _sysv_shm() == shm_before


def test_deep_directory_does_not_break_later_runs(box):
    deep = box.run("import os\nfor i in range(4000):\n    os.mkdir('d')\n    os.chdir('d')\nprint('deep')")
    assert "deep" in deep.stdout
    assert box.run("print('next')").stdout.strip() == "next"


def test_cannot_read_the_trainer_secrets_or_files(box, monkeypatch):
    monkeypatch.setenv("ALIGN_TEST_SECRET", "s3cret-value")
    prog = ("import os\nprint(os.environ.get('ALIGN_TEST_SECRET'))\n"
            "for p in ('/proc/1/environ', '/proc/%d/environ' % os.getppid()):\n"
            "    try:\n        print(open(p, 'rb').read())\n    except OSError as e:\n        print('no', e.errno)\n"
            f"print(os.path.exists({os.getcwd()!r} + '/rewards/code.py'), len(os.listdir('/proc')))\n")
    res = box.run(prog)
    assert "s3cret-value" not in res.stdout + res.stderr
    assert "False" in res.stdout, "the trainer's working directory is hidden"


def test_cannot_see_or_kill_the_trainer(box):
    res = box.run(f"import os, signal\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
                  f"os.kill({os.getpid()}, signal.SIGKILL)")
    assert res.status == "error"  # we are still here to assert it
    assert res.stdout.startswith("[1, 2") and len(eval(res.stdout.splitlines()[0])) <= 3


def test_huge_output_is_capped(box):
    res = box.run("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 1_000_000)\n")
    assert len(res.stdout) <= LIMITS.output_bytes


def test_daemons_and_orphan_threads_end_with_the_run(box):
    prog = ("import os, threading, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        time.sleep(30)\n    os._exit(0)\n"
            "threading.Thread(target=time.sleep, args=(30,)).start()\nprint('parent done')\n")
    res = box.run(prog)
    assert res.status in ("ok", "timeout") and "parent done" in res.stdout
    assert _uid_processes(box.uids) == []


def test_two_sandboxes_on_one_host_never_share_a_uid(box):
    other = Sandbox(LIMITS, workers=2)
    assert not set(other.uids) & set(box.uids)
    results = []
    ths = [threading.Thread(target=lambda b=b: results.append(b.run("import time\ntime.sleep(0.3)\nprint(7)")))
           for b in (box, other, box, other)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert [r.stdout.strip() for r in results] == ["7"] * 4


def test_isolation_is_required_unless_opted_out(monkeypatch):
    monkeypatch.setattr(sbx, "_complete", lambda info: False)
    with pytest.raises(SandboxUnavailable, match="allow_unisolated_code"):
        Sandbox(LIMITS, workers=1)
    unsafe = Sandbox(LIMITS, workers=1, require_isolation=False)
    assert unsafe.run("print(3)").stdout.strip() == "3"
