"""Local sandbox for untrusted Python: every run in fresh namespaces, its own uid, a per-run cgroup.

A run (``rewards/_runner.py``, started anew for each sample) is PID 1 of new PID, mount, IPC, network and UTS
namespaces: private tmpfs where anyone may write, every other mount read-only, homes and caches hidden, no
network (not even loopback), and when it ends the kernel ends every process and file it made. The candidate
runs under a uid no other run on this host holds at the same time (slots are claimed with file locks, so
two trainers or ranks on one host never share one), in a cgroup that bounds the memory and process count of
the whole run, under rlimits and ``no_new_privs``. Tests run in a separate harness process under another uid
(:mod:`rewards._harness`); the candidate only answers calls with plain data.

Isolation is required: without root and namespaces a :class:`Sandbox` refuses to start unless it is created
with ``require_isolation=False`` (``rewards.allow_unisolated_code=true``), which runs candidates as this user.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pwd
import stat
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
UID_BASE, HARNESS_UID_BASE, MAX_SLOTS = 61000, 63000, 1024
LOCK_DIR = Path("/run/align-sandbox")
RUNNER = Path(__file__).with_name("_runner.py")
CANDIDATE = Path(__file__).with_name("_wire.py").read_text() + Path(__file__).with_name("_candidate.py").read_text()


class SandboxUnavailable(RuntimeError):
    """Isolation is required and this machine cannot provide it."""


@dataclass
class Limits:
    timeout_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 512
    """Per process (address space) and for the whole run (cgroup)."""
    file_mb: int = 16
    processes: int = 32
    """For the whole run (cgroup pids) and per uid (rlimit)."""
    open_files: int = 64
    output_bytes: int = 64_000
    tmp_mb: int = 64


@dataclass
class RunResult:
    status: str  # ok | error | timeout | setup-error
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    extra: dict = field(default_factory=dict)


def _world_usable(path: str) -> bool:
    p = Path(path).resolve()
    return all(part.stat().st_mode & stat.S_IXOTH for part in [p, *p.parents])


def _cgroup_roots() -> dict[str, Path]:
    """Writable cgroup directories under which a run's own group can be made: v2, else v1 memory + pids."""
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").is_file():
        own = Path(open("/proc/self/cgroup").read().split("::")[-1].strip().lstrip("/"))
        base = v2 / own
        ctl = (base / "cgroup.subtree_control").read_text() if (base / "cgroup.subtree_control").exists() else ""
        return {"v2": base} if {"memory", "pids"} <= set(ctl.split()) and os.access(base, os.W_OK) else {}
    roots = {}
    for line in open("/proc/self/cgroup"):
        _, ctrl, path = line.strip().split(":", 2)
        for name in ("memory", "pids"):
            if name in ctrl.split(",") and os.access(v2 / name / path.lstrip("/"), os.W_OK):
                roots[name] = v2 / name / path.lstrip("/")
    return roots if set(roots) == {"memory", "pids"} else {}


def _probe_namespaces(python: str) -> bool:
    res = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--ipc", "--net", "--uts", "true"],
                         capture_output=True) if os.path.exists("/usr/bin/unshare") else None
    return res is not None and res.returncode == 0


_ISOLATION: dict | None = None


def isolation() -> dict:
    """Which isolation layers this machine provides (probed once)."""
    global _ISOLATION
    if _ISOLATION is None:
        root = os.geteuid() == 0
        python = next((p for p in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3")
                       if os.path.exists(p) and (not root or _world_usable(p))), sys.executable)
        cgroups = _cgroup_roots() if root else {}
        _ISOLATION = {"namespaces": root and _probe_namespaces(python), "separate_uid": root,
                      "cgroup": "v2" if "v2" in cgroups else ("v1" if cgroups else None), "rlimits": True,
                      "python": python, "cgroup_roots": {k: str(v) for k, v in cgroups.items()}}
    return _ISOLATION


def _complete(info: dict) -> bool:
    return bool(info["namespaces"] and info["separate_uid"] and info["cgroup"])


def _masks(python: str) -> list[str]:
    """Directories hidden from candidates: homes, the trainer's working directory, dataset caches (never one
    that holds the candidates' interpreter)."""
    keep = os.path.realpath(python)
    dirs = [pwd.getpwuid(os.getuid()).pw_dir, "/home", "/root", os.getcwd(), os.environ.get("HF_HOME", ""),
            os.path.expanduser("~/.cache")]
    scratch = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # fresh tmpfs in every run already
    out = []
    for d in dict.fromkeys(os.path.realpath(d) for d in dirs if d):
        inside_scratch = any((d + "/").startswith(s + "/") for s in scratch)
        if d != "/" and not (keep + "/").startswith(d + "/") and not inside_scratch:
            out.append(d)
    return out


class _Slots:
    """uid slots claimed host-wide with ``flock``: no two live sandboxes on this host share a uid."""

    def __init__(self, n: int):
        LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
        self.free: list[int] = []
        self._files = []
        for k in range(MAX_SLOTS):
            fh = open(LOCK_DIR / f"slot-{k}.lock", "w")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            self._files.append(fh)
            self.free.append(k)
            if len(self.free) == n:
                break
        if len(self.free) < n:
            raise SandboxUnavailable(f"sandbox: only {len(self.free)} of {n} uid slots free on this host")
        self.cv = threading.Condition()

    def take(self) -> int:
        with self.cv:
            self.cv.wait_for(lambda: self.free)
            return self.free.pop()

    def give(self, k: int) -> None:
        with self.cv:
            self.free.append(k)
            self.cv.notify()


class Sandbox:
    """Runs untrusted Python, ``workers`` runs at a time, each in its own isolated run."""

    def __init__(self, limits: Limits | None = None, workers: int = 0, require_isolation: bool = True):
        self.limits = limits or Limits()
        self.info = isolation()
        self.isolated = _complete(self.info)
        if not self.isolated:
            if require_isolation:
                raise SandboxUnavailable(
                    f"the code sandbox needs root with PID/mount/network namespaces and cgroups (found {self.info}); "
                    "set rewards.allow_unisolated_code=true to run untrusted code as this user (unsafe)")
            log.warning("SANDBOX ISOLATION OFF (rewards.allow_unisolated_code=true): candidates run as this user "
                        "and can read its files and environment")
        self.workers = workers or os.cpu_count() or 1
        self.slots = _Slots(self.workers) if self.isolated else None
        self.uids = [UID_BASE + k for k in self.slots.free] if self.slots else []
        self.masks = _masks(self.info["python"])

    def run(self, program: str, stdin: str = "") -> RunResult:
        """Run ``program`` with ``stdin``; its stdout/stderr come back (capped) for the caller to judge."""
        return self._job({"mode": "script", "program": program, "stdin": stdin})

    def run_tests(self, code: str, tests: list[str], setup: str = "", remote: list[str] | None = None) -> RunResult:
        """Load ``code`` in the candidate process; run each test snippet in the harness with the candidate's
        functions (``remote``; ``None``: all it defines) bound as proxies. ``extra``: passed, total."""
        spec = {"setup": setup, "remote": remote, "tests": list(tests)}
        res = self._job({"mode": "tests", "program": CANDIDATE, "code": code, "spec": spec, "stdin": ""})
        res.extra.setdefault("passed", 0)
        res.extra["total"] = len(tests)
        return res

    def _job(self, job: dict) -> RunResult:
        slot = self.slots.take() if self.slots else None
        groups, work = [], None
        try:
            if slot is not None:
                groups = self._cgroups(slot)
            else:
                work = tempfile.mkdtemp(prefix="align-sbx-")
            job.update(limits=asdict(self.limits), isolate=self.isolated, mask=self.masks, python=self.info["python"],
                       uid=None if slot is None else UID_BASE + slot,
                       harness_uid=None if slot is None else HARNESS_UID_BASE + slot,
                       cgroups=[str(g / "cgroup.procs") for g in groups], workdir=work)
            return self._launch(job)
        finally:
            for g in groups:
                _remove_cgroup(g)
            if work:
                subprocess.run(["rm", "-rf", work], check=False)
            if slot is not None:
                self.slots.give(slot)

    def _cgroups(self, slot: int) -> list[Path]:
        roots = {k: Path(v) for k, v in self.info["cgroup_roots"].items()}
        name = f"align-sbx-{os.getpid()}-{slot}"
        mem = self.limits.memory_mb << 20
        if "v2" in roots:
            g = roots["v2"] / name
            g.mkdir(exist_ok=True)
            (g / "memory.max").write_text(str(mem))
            (g / "memory.swap.max").write_text("0") if (g / "memory.swap.max").exists() else None
            (g / "pids.max").write_text(str(self.limits.processes))
            return [g]
        m, p = roots["memory"] / name, roots["pids"] / name
        m.mkdir(exist_ok=True)
        p.mkdir(exist_ok=True)
        (m / "memory.limit_in_bytes").write_text(str(mem))
        (p / "pids.max").write_text(str(self.limits.processes))
        return [m, p]

    def _launch(self, job: dict) -> RunResult:
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        try:
            proc = subprocess.run([self.info["python"], "-I", "-S", str(RUNNER)], input=json.dumps(job).encode(),
                                  capture_output=True, env=env, timeout=self.limits.timeout_s + 20)
            out = json.loads(proc.stdout)
        except (subprocess.TimeoutExpired, ValueError) as e:
            return RunResult("setup-error", None, "", f"sandbox runner failed: {type(e).__name__}", 0.0)
        extra = {k: out[k] for k in ("passed", "finished", "complete", "setup_error") if out.get(k) is not None}
        if out.get("setup_error"):
            log.warning("sandbox set-up failed: %s", out["setup_error"])
        return RunResult(out["status"], out["returncode"], out["stdout"], out["stderr"], out["seconds"], extra)


def _remove_cgroup(g: Path) -> None:
    """A run's cgroup, once its processes are gone: they die with the run's PID namespace; whatever is still
    listed is killed here (host pids), so no candidate process outlives its run."""
    for _ in range(200):
        try:
            for pid in (g / "cgroup.procs").read_text().split():
                os.kill(int(pid), 9)
        except (OSError, ValueError):
            pass
        try:
            g.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            threading.Event().wait(0.005)
    log.warning("sandbox: cgroup %s still busy", g)
