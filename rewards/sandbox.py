"""Local sandbox for untrusted Python: one process group per run, rlimits, hard wall-clock kill,
fresh temp dir, scrubbed environment, capped output, its own uid and an empty network namespace.

Isolation layers (see :func:`isolation`): a private network namespace (only a down loopback, so
nothing is reachable, 127.0.0.1 included) where the kernel allows it; a dedicated unprivileged
uid per concurrent slot (cannot signal the trainer, read its files or its environment, and its
processes and stray files are found and removed after the run); rlimits on CPU seconds, address
space, file size, processes and open files. A run whose isolation is missing is refused when
``require_isolation`` is set, else it runs with a loud one-time warning.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
CLONE_NEWNET = 0x40000000
UID_BASE = 61000
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


@dataclass
class Limits:
    timeout_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 512
    file_mb: int = 16
    processes: int = 32
    open_files: int = 64
    output_bytes: int = 64_000


@dataclass
class RunResult:
    status: str  # ok | error | timeout
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    extra: dict = field(default_factory=dict)


def _world_usable(path: str) -> bool:
    p = Path(path).resolve()
    for part in [p, *p.parents]:
        mode = part.stat().st_mode
        if part != p and not mode & stat.S_IXOTH:
            return False
    return bool(p.stat().st_mode & stat.S_IXOTH)


def _probe_netns() -> bool:
    pid = os.fork()
    if pid == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        os._exit(0 if libc.unshare(CLONE_NEWNET) == 0 else 1)
    return os.waitpid(pid, 0)[1] == 0


_ISOLATION: dict | None = None


def isolation() -> dict:
    """Which isolation layers this machine provides (probed once)."""
    global _ISOLATION
    if _ISOLATION is None:
        root = os.geteuid() == 0
        interp = next((p for p in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3")
                       if os.path.exists(p) and (not root or _world_usable(p))), sys.executable)
        _ISOLATION = {"network_namespace": root and _probe_netns(), "separate_uid": root,
                      "rlimits": True, "python": interp}
        if not (_ISOLATION["network_namespace"] and _ISOLATION["separate_uid"]):
            log.warning("SANDBOX ISOLATION INCOMPLETE: %s — untrusted code could reach the network or this "
                        "user's files; set require_isolation to refuse such runs", _ISOLATION)
    return _ISOLATION


def _preexec(uid: int | None, limits: Limits, netns: bool):
    def fn():
        os.setsid()
        if netns:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0:
                os._exit(125)
        mb = 1024 * 1024
        for res, val in ((resource.RLIMIT_CPU, limits.cpu_s), (resource.RLIMIT_AS, limits.memory_mb * mb),
                         (resource.RLIMIT_FSIZE, limits.file_mb * mb), (resource.RLIMIT_NPROC, limits.processes),
                         (resource.RLIMIT_NOFILE, limits.open_files), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(res, (val, val))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
    return fn


def _pids_of(uid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid == uid:
                    with open(f"/proc/{d}/stat") as fh:
                        state = fh.read().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        pids.append(int(d))
            except (OSError, IndexError):
                pass
    return pids


def _kill_uid(uid: int) -> None:
    """Signal every process of ``uid`` in one syscall: a helper becomes that uid and calls kill(-1)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        os._exit(0)
    os.waitpid(pid, 0)


def _reap(uid: int | None, pgid: int) -> None:
    """Kill the process group, then anything else the sandbox uid still runs (fork bombs, daemons)."""
    if pgid > 0:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if uid is None:
        return
    deadline = time.monotonic() + 5
    while _pids_of(uid) and time.monotonic() < deadline:
        _kill_uid(uid)
        time.sleep(0.005)


def _remove_strays(uid: int) -> None:
    """Delete files the sandbox uid left in world-writable scratch dirs."""
    for base in SCRATCH_DIRS:
        if not os.path.isdir(base):
            continue
        for dirpath, dirnames, filenames in os.walk(base, topdown=False):
            for name in filenames + dirnames:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if st.st_uid == uid:
                    shutil.rmtree(path, ignore_errors=True) if stat.S_ISDIR(st.st_mode) else os.unlink(path)


def _read_capped(stream, cap: int, out: list) -> None:
    data = b""
    while chunk := stream.read(65536):
        if len(data) < cap:
            data += chunk[: cap - len(data)]
    out.append(data.decode("utf-8", "replace"))


class Sandbox:
    """Runs Python programs concurrently, one uid slot per worker."""

    def __init__(self, limits: Limits | None = None, workers: int = 0, require_isolation: bool = False):
        self.limits = limits or Limits()
        self.info = isolation()
        if require_isolation and not (self.info["network_namespace"] and self.info["separate_uid"]):
            raise RuntimeError(f"sandbox isolation unavailable: {self.info}")
        self.workers = workers or os.cpu_count() or 1
        self.slots: queue.Queue = queue.Queue()
        for i in range(self.workers):
            self.slots.put(UID_BASE + i if self.info["separate_uid"] else None)

    def run(self, program: str, stdin: str = "", extra_fds: dict[int, bytes] | None = None) -> RunResult:
        uid = self.slots.get()
        try:
            return self._run(program, stdin, uid, extra_fds or {})
        finally:
            self.slots.put(uid)

    def _run(self, program: str, stdin: str, uid: int | None, extra_fds: dict[int, bytes]) -> RunResult:
        lim = self.limits
        work = Path(tempfile.mkdtemp(prefix="align-sbx-"))
        try:
            (work / "main.py").write_text(program)
            if uid is not None:
                for p in (work, work / "main.py"):
                    os.chown(p, uid, uid)
            env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
                   "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
            pipes = {fd: os.pipe() for fd in extra_fds}
            pass_fds = []
            for fd, (r, w) in pipes.items():
                os.write(w, extra_fds[fd])
                os.close(w)
                pass_fds.append(r)
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [self.info["python"], "-I", "-S", "main.py", *[str(r) for r in pass_fds]], cwd=work, env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds,
                preexec_fn=_preexec(uid, lim, self.info["network_namespace"]), close_fds=True)
            for r, _ in pipes.values():
                os.close(r)
            out: list = []
            err: list = []
            readers = [threading.Thread(target=_read_capped, args=(proc.stdout, lim.output_bytes, out)),
                       threading.Thread(target=_read_capped, args=(proc.stderr, lim.output_bytes, err))]
            for th in readers:
                th.start()
            try:
                proc.stdin.write(stdin.encode())
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            status = "ok"
            try:
                proc.wait(timeout=lim.timeout_s)
            except subprocess.TimeoutExpired:
                status = "timeout"
            _reap(uid, proc.pid)
            proc.wait()
            for th in readers:
                th.join(timeout=2)
            secs = time.monotonic() - t0
            rc = proc.returncode
            if status == "ok" and rc != 0:
                status = "timeout" if rc in (-signal.SIGXCPU, -signal.SIGKILL) and secs >= lim.cpu_s else "error"
            return RunResult(status, rc, out[0] if out else "", err[0] if err else "", secs)
        finally:
            if uid is not None:
                _reap(uid, -1)
                _remove_strays(uid)
            shutil.rmtree(work, ignore_errors=True)
