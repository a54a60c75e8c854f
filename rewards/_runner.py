"""One sandboxed run, as root: ``python -I -S _runner.py`` reads a job (JSON) on stdin, writes a result on stdout.

Process layout (every run is new; nothing is reused between samples):

    runner (this process: outside the run, enforces the wall clock, collects output)
      └─ init: PID 1 of fresh PID / mount / IPC / network / UTS namespaces: private tmpfs on /tmp, /var/tmp,
         │     /dev/shm, /run/lock; a fresh /proc; every other mount read-only; homes and caches masked
         ├─ candidate: its own uid, per-run cgroup (memory, pids), rlimits, no new privileges, exec'd anew
         └─ (test runs) init becomes the harness: another uid, not dumpable, runs the tests, counts the passes

When init exits the kernel kills everything left in its PID namespace, and the mount and IPC namespaces (files,
sockets, shared memory) vanish with the last process: clean-up is ending the run, not a walk. Stdlib only.
"""

import ctypes
import fcntl
import json
import os
import resource
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness  # noqa: E402

NEWNS, NEWUTS, NEWIPC, NEWPID, NEWNET = 0x20000, 0x4000000, 0x8000000, 0x20000000, 0x40000000
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
SCRATCH = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")
_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def _mount(src, target, fstype, flags, data=None) -> None:
    _check(_libc.mount(src and src.encode(), target.encode(), fstype and fstype.encode(), flags,
                       data and data.encode()), f"mount {target}")


def _mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return [line.split()[4] for line in fh]


def _private_filesystem(job: dict) -> None:
    """Every mount read-only, fresh tmpfs where anyone may write, homes and caches hidden, /proc of this run."""
    _mount(None, "/", None, REC | PRIVATE)
    for point in _mountpoints():
        if not point.startswith(("/proc", "/sys", "/dev")):
            _libc.mount(None, point.encode(), None, REMOUNT | BIND | RDONLY, None)  # best effort per mount
    size = f"size={job['limits']['tmp_mb']}m,mode=1777"
    for d in SCRATCH:
        if os.path.isdir(d):
            _mount("tmpfs", d, "tmpfs", NOSUID | NODEV, size)
    for d in job["mask"]:
        if os.path.isdir(d):
            _mount("tmpfs", d, "tmpfs", NOSUID | NODEV | NOEXEC | RDONLY, "size=64k,mode=755")
    _mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC)
    _libc.sethostname(b"sandbox", 7)


def _limit(lim: dict) -> None:
    mb = 1 << 20
    for res, val in ((resource.RLIMIT_CPU, lim["cpu_s"]), (resource.RLIMIT_AS, lim["memory_mb"] * mb),
                     (resource.RLIMIT_FSIZE, lim["file_mb"] * mb), (resource.RLIMIT_NOFILE, lim["open_files"]),
                     (resource.RLIMIT_NPROC, lim["processes"]), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (val, val))


def _become(uid) -> None:
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def _candidate(job: dict, work: str, fds: dict) -> None:
    """Child of init: join the run's cgroups, drop to the candidate uid, exec a fresh interpreter."""
    try:
        os.setsid()
        for path in job["cgroups"]:
            with open(path, "w") as fh:
                fh.write("0")
        high = {target: fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for target, fd in fds.items()}
        for target, fd in high.items():  # through fds >= 100, so no target clobbers a source
            os.dup2(fd, target)
        os.closerange(max(fds) + 1, 4096)
        _limit(job["limits"])
        _become(job["uid"])
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        os.chdir(work)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        os.execve(job["python"], [job["python"], "-I", "-S", "main.py"], env)
    finally:
        os._exit(127)


def _init(job: dict, pipes: dict) -> None:
    """PID 1 of the run: private filesystem, the program, the candidate; then its exit status or the harness."""
    try:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if job["isolate"]:
            _private_filesystem(job)
            work = "/tmp/work"
        else:
            work = job["workdir"]
        os.makedirs(work, exist_ok=True)
        files = {"main.py": job["program"], **({"solution.py": job["code"]} if job["mode"] == "tests" else {})}
        for name, text in files.items():
            with open(os.path.join(work, name), "w") as fh:
                fh.write(text)
        if job["uid"] is not None:
            for p in [work, *(os.path.join(work, n) for n in files)]:
                os.chown(p, job["uid"], job["uid"])
        null = os.open(os.devnull, os.O_RDWR)
        if job["mode"] == "tests":
            fds = {0: null, 1: null, 2: null, 3: pipes["req_r"], 4: pipes["ans_w"]}
        else:
            fds = {0: pipes["in_r"], 1: pipes["out_w"], 2: pipes["err_w"]}
        child = os.fork()
        if child == 0:
            _candidate(job, work, fds)
        keep = ("res_w", "req_w", "ans_r") if job["mode"] == "tests" else ("res_w",)
        for k, fd in pipes.items():  # the candidate sees end-of-file only when no one else holds its pipes
            if k not in keep:
                os.close(fd)
        os.write(pipes["res_w"], b"pid %d\n" % child)
        if job["mode"] == "tests":
            _harness_side(job, pipes)
            os._exit(0)
        _, status = os.waitpid(child, 0)
        os._exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    except BaseException as e:  # noqa: BLE001 - set-up failed: say so, never run the candidate half-isolated
        os.write(pipes["res_w"], ("setup-error " + repr(e)[:300] + "\n").encode())
        os._exit(125)


def _spawn(job: dict, pipes: dict) -> None:
    """Enter the new namespaces and start init (this process cannot: a process that unshared its PID namespace
    can no longer start threads, and the runner needs them). Mirrors init's exit status; dies with the runner."""
    try:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if job["isolate"]:
            _check(_libc.unshare(NEWPID | NEWNS | NEWIPC | NEWNET | NEWUTS), "unshare")
        pid = os.fork()
        if pid == 0:
            _init(job, pipes)
        for fd in pipes.values():
            os.close(fd)
        _, status = os.waitpid(pid, 0)
        os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    except BaseException as e:  # noqa: BLE001
        os.write(pipes["res_w"], ("setup-error " + repr(e)[:300] + "\n").encode())
        os._exit(125)


def _harness_side(job: dict, pipes: dict) -> None:
    parent = os.getppid()
    _become(job["harness_uid"])
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # a change of uid clears it
    if os.getppid() != parent:  # the runner was killed before it was armed again
        os._exit(1)
    channel = _harness.Channel(os.fdopen(pipes["ans_r"], "rb"), os.fdopen(pipes["req_w"], "wb"))
    res = pipes["res_w"]
    _harness.run_tests(channel, job["spec"], lambda ok: os.write(res, b"1\n" if ok else b"0\n"))
    os.write(res, b"end\n")


def _read_capped(fd: int, cap: int, out: list) -> None:
    data = bytearray()
    while chunk := os.read(fd, 65536):
        if len(data) < cap:
            data += chunk[: cap - len(data)]
    os.close(fd)
    out.append(bytes(data))


def _feed(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:65536]):]
    except OSError:
        pass
    finally:
        os.close(fd)


def _pipes(mode: str) -> dict:
    names = ["res"] + (["req", "ans"] if mode == "tests" else ["in", "out", "err"])
    pipes = {}
    for n in names:
        pipes[f"{n}_r"], pipes[f"{n}_w"] = os.pipe()
    return pipes


def main() -> None:
    job = json.loads(sys.stdin.buffer.read())
    lim, pipes = job["limits"], _pipes(job["mode"])
    t0 = time.monotonic()
    init = os.fork()
    if init == 0:
        _spawn(job, pipes)
    for k, fd in pipes.items():
        if k not in ("res_r", "in_w", "out_r", "err_r"):
            os.close(fd)
    outs = {k: [] for k in ("res", "out", "err")}
    threads = [threading.Thread(target=_read_capped, args=(pipes[f"{k}_r"], lim["output_bytes"], outs[k]), daemon=True)
               for k in outs if f"{k}_r" in pipes]
    if "in_w" in pipes:
        threads.append(threading.Thread(target=_feed, args=(pipes["in_w"], job["stdin"].encode()), daemon=True))
    for th in threads:
        th.start()
    status = _wait(init, t0 + lim["timeout_s"])
    secs = time.monotonic() - t0
    if not job["isolate"]:
        _kill_group(outs, threads[0])
    for th in threads[:len(outs)]:
        th.join(timeout=2)
    print(json.dumps(_result(job, status, secs, outs)))


def _kill_group(outs: dict, reader: threading.Thread) -> None:
    """Without a PID namespace: kill the candidate's session (its daemons escape this; isolation is opt-out)."""
    reader.join(timeout=0.5)
    for line in b"".join(outs["res"]).decode().splitlines():
        if line.startswith("pid "):
            try:
                os.killpg(int(line.split()[1]), signal.SIGKILL)
            except OSError:
                pass


def _wait(pid: int, deadline: float):
    """Exit status of init, or ``None`` if it ran past the deadline (then it is killed, and its run with it)."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.002)


def _result(job: dict, status, secs: float, outs: dict) -> dict:
    res_lines = b"".join(outs["res"]).decode("utf-8", "replace").splitlines()
    setup = [ln for ln in res_lines if ln.startswith("setup-error")]
    rc = None if status is None else os.waitstatus_to_exitcode(status)
    out = {"seconds": secs, "returncode": rc, "setup_error": setup[0] if setup else None,
           "stdout": b"".join(outs["out"]).decode("utf-8", "replace"),
           "stderr": b"".join(outs["err"]).decode("utf-8", "replace")}
    if job["mode"] == "tests":
        marks = [ln for ln in res_lines if ln in ("0", "1")]
        out.update(passed=marks.count("1"), finished=len(marks), complete="end" in res_lines)
    if status is None:
        out["status"] = "timeout"
    elif setup:
        out["status"] = "setup-error"
    elif job["mode"] == "tests":
        out["status"] = "ok" if out["complete"] else "error"
    else:
        code = rc if rc is not None else 1
        cpu_out = code in (128 + signal.SIGXCPU, 128 + signal.SIGKILL) and secs >= job["limits"]["cpu_s"]
        out["status"] = "ok" if code == 0 else ("timeout" if cpu_out else "error")
    return out


if __name__ == "__main__":
    main()
