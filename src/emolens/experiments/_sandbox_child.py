"""The sandbox's child side: `python -I -S -c <this file's text> IN_FD OUT_FD` (see sandbox.py).

It reads its whole job from the pipe IN_FD (a JSON header line, then the code, then the tests),
closes that pipe, fences itself in (mounts, uid, capabilities, resource limits), writes b"R" to
the pipe OUT_FD, runs the code and then the tests in one fresh namespace, and writes the
run's sentinel to OUT_FD only if the tests returned. Standard library only: nothing outside
the interpreter's own library is importable in here.
"""

from __future__ import annotations

import json
import os
import sys

# Checked by type checkers only: the child imports nothing it does not need at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ctypes import CDLL
    from types import TracebackType

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 21
PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS = 24, 28, 38
SECBITS_ALL_LOCKED = 0x3F  # noroot, no-setuid-fixup, keep-caps-off, each locked
MOUNT_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
               "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}  # fmt: skip


def read_job(fd: int) -> tuple[dict, str, str]:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    header, _, body = b"".join(chunks).partition(b"\n")
    job = json.loads(header)
    code = body[: job["code_bytes"]].decode()
    tests = body[job["code_bytes"] :].decode()
    return job, code, tests


def libc_call(libc: CDLL, name: str, *args: object) -> None:
    import ctypes

    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}{args!r}: {os.strerror(errno)}")


def fence_filesystem(libc: CDLL, job: dict) -> None:
    """Read-only everything, private scratch dirs, masked private dirs, a fresh work dir."""

    def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
        enc = [None if x is None else x.encode() for x in (source, target, fstype, data)]
        libc_call(libc, "mount", enc[0], enc[1], enc[2], flags, enc[3])

    keep = [os.open(path, os.O_PATH) for path in job["expose"]]  # before masks hide them
    with open("/proc/self/mountinfo") as handle:
        mounts = [line.split() for line in handle]
    for fields in mounts:
        point = fields[4].encode().decode("unicode_escape")
        if point.split("/")[1] in ("proc", "sys", "dev"):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in fields[5].split(","):  # keep the flags a user namespace may not drop
            flags |= MOUNT_FLAGS.get(option, 0)
        mount("none", point, None, flags, None)
    for path in job["scratch"]:
        size = f"size={job['file_size_mb']}m,mode=1777"
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, size)
    for path in job["masks"]:
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for fd, path in zip(keep, job["expose"], strict=True):
        os.makedirs(path, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC, None)
        mount("none", path, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
        os.close(fd)
    for path in job["masks"]:
        mount("none", path, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "mode=755")
    for path in job["masks_again"]:
        mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    os.mkdir(job["workdir"], 0o700)
    if job["uid"] is not None:
        os.chown(job["workdir"], job["uid"], job["uid"])


def drop_privileges(libc: CDLL, job: dict) -> None:
    """Become the throw-away uid (as real root) or shed every capability (in a user
    namespace); in every mode, no exec may gain privileges again."""
    import ctypes

    if job["uid"] is not None:
        os.setgroups([])
        os.setresgid(job["uid"], job["uid"], job["uid"])
        os.setresuid(job["uid"], job["uid"], job["uid"])
    elif job["mode"] == "userns":
        libc_call(libc, "prctl", PR_SET_SECUREBITS, SECBITS_ALL_LOCKED, 0, 0, 0)
        cap = 0
        while libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
            cap += 1
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
        data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words: all zero
        libc_call(libc, "capset", header, data)
    libc_call(libc, "prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def own_process_count() -> int:
    uid, count = os.getuid(), 0
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/status") as handle:
                real = next(line for line in handle if line.startswith("Uid:")).split()[1]
        except (OSError, StopIteration):
            continue
        count += int(real) == uid
    return count


def set_limits(job: dict) -> None:
    import resource

    mib = 1 << 20
    cpu = int(job["cpu_seconds"] + 0.999)
    processes = job["processes"]
    if job["process_limit"] == "relative":
        processes += own_process_count()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (job["memory_mb"] * mib, job["memory_mb"] * mib))
    resource.setrlimit(resource.RLIMIT_FSIZE, (job["file_size_mb"] * mib,) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))


def report(error: BaseException, tb: TracebackType | None, sources: dict[str, str]) -> None:
    import linecache
    import traceback

    for name, text in sources.items():
        linecache.cache[name] = (len(text), None, text.splitlines(True), name)
    traceback.print_exception(type(error), error, tb)


def main() -> None:
    job, code, tests = read_job(int(sys.argv[1]))
    out = int(sys.argv[2])
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if job["mode"] != "plain":
        fence_filesystem(libc, job)
    os.chdir(job["workdir"])
    drop_privileges(libc, job)
    set_limits(job)
    sentinel = job.pop("sentinel").encode()
    # Everything the harness needs after the model's code has run is bound here, so that
    # rebinding builtins or module attributes cannot reach it.
    run, build, write, exit_now = exec, compile, os.write, os._exit
    settrace, setprofile, streams = sys.settrace, sys.setprofile, (sys.stdout, sys.stderr)
    sources = {"<solution>": code, "<tests>": tests}
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    write(out, b"R")
    try:
        run(build(code, "<solution>", "exec"), namespace)
        settrace(None)
        setprofile(None)
        run(build(tests, "<tests>", "exec"), namespace)
    except SystemExit as stop:
        print(f"SystemExit({stop.code!r}) before the tests finished", file=streams[1])
        status = 1
    except BaseException as error:  # the tests failed or the code crashed: show where
        trace = error.__traceback__
        report(error, trace.tb_next if trace else None, sources)
        status = 1
    else:
        write(out, sentinel)
        status = 0
    for stream in streams:
        try:
            stream.flush()
        except Exception:  # the code may have closed or replaced the streams
            pass
    exit_now(status)


main()
