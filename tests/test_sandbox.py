"""The sandbox: honest runs, and escapes that fool or harm a naive runner but not ours."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from emolens.experiments import sandbox
from emolens.experiments.sandbox import Limits, isolation, run_tests

TESTS = "def check(candidate):\n    assert candidate(2) == 3\n"
CALL = "check(add_one)\n"
HONEST = "def add_one(x):\n    return x + 1\n"
WRONG = "def add_one(x):\n    return x\n"
QUICK = Limits(wall_seconds=5, cpu_seconds=3)

# A naive runner as often written: tests and solution in files beside each other, the tests'
# definitions loaded first, the call last, success = exit status 0, no limits, same user.
NAIVE_HARNESS = """
namespace = {"__name__": "__main__"}
for name in ("tests.py", "solution.py", "call.py"):
    exec(open(name).read(), namespace)
"""


def naive_run(code, folder, tests=TESTS, call=CALL, timeout=20):
    for name, text in (("tests.py", tests), ("solution.py", code), ("call.py", call)):
        (folder / name).write_text(text)
    with open(folder / "out.txt", "w") as out:  # a file, not a pipe: leftovers may hold it
        proc = subprocess.run([sys.executable, "-c", NAIVE_HARNESS], cwd=folder, stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout)  # fmt: skip
    return proc.returncode == 0, (folder / "out.txt").read_text()


def ours(code, tests=TESTS + CALL, limits=QUICK):
    return run_tests(code, tests, limits=limits)


def processes_running(argv: list[str]) -> list[int]:
    wanted = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if handle.read() == wanted:
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def wait_until_gone(argv, seconds=2.0):
    deadline = time.monotonic() + seconds
    while (left := processes_running(argv)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_an_honest_solution_passes_and_a_wrong_one_fails_with_a_traceback():
    good, bad = ours(HONEST), ours(WRONG)
    assert good.passed and good.returncode == 0 and not good.timed_out
    assert not bad.passed and "AssertionError" in bad.stderr and '"<tests>", line 2' in bad.stderr
    assert good.isolation == isolation()


def test_the_strongest_isolation_this_machine_allows_is_used():
    iso = isolation()
    if os.geteuid() == 0 and shutil.which("unshare"):
        assert iso.mode == "root" and iso.uid_switch and iso.process_limit == "per-uid"
        assert iso.network_namespace and iso.pid_namespace and iso.private_filesystem
    else:
        assert iso.mode in ("userns", "plain") and not iso.uid_switch


def test_a_fork_bomb_is_capped_and_killed():
    iso = isolation()
    if iso.process_limit == "none":  # root without a uid switch: a real bomb would take the
        assert iso.mode == "plain" and not iso.uid_switch  # machine down; the report says so
        return
    start = time.monotonic()
    bomb = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    result = ours(bomb, "", Limits(wall_seconds=1.5, cpu_seconds=1, processes=16))
    assert result.timed_out and not result.passed and time.monotonic() - start < 4


def test_spawned_processes_are_capped_and_none_outlives_the_run(tmp_path):
    argv = ["sleep", f"{random.randint(200, 999)}.{random.randint(1000, 9999)}"]
    flood = (
        "import os\nforked = 0\nfor _ in range(40):\n    try:\n        if os.fork() == 0:\n"
        f"            os.setsid()\n            os.execv('/bin/sleep', {argv!r})\n"
        "        forked += 1\n    except OSError:\n        break\nprint('forked', forked)\n"
        + HONEST
    )
    fooled, out = naive_run(flood, tmp_path)
    survivors = processes_running(argv)
    for pid in survivors:  # the naive runner's leftovers: ours to clean up
        os.kill(pid, signal.SIGKILL)
    assert fooled and "forked 40" in out and len(survivors) == 40
    result = ours(flood, limits=Limits(wall_seconds=5, processes=8))
    left = wait_until_gone(argv)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    iso = result.isolation
    forked = int(re.search(r"forked (\d+)", result.stdout).group(1))
    assert result.passed and (forked < 8) == (iso.process_limit != "none")
    assert (left == []) == (iso.pid_namespace or iso.uid_switch)


def test_a_memory_hog_hits_the_address_space_limit(tmp_path):
    hog = "block = bytearray(1 << 30)\nprint('allocated', len(block))\n" + HONEST
    fooled, out = naive_run(hog, tmp_path)
    assert fooled and "allocated" in out
    result = ours(hog, limits=Limits(memory_mb=256))
    assert not result.passed and "MemoryError" in result.stderr and "allocated" not in result.stdout


def test_an_infinite_loop_is_stopped_at_the_wall_time(tmp_path):
    loop = "while True:\n    pass\n"
    with pytest.raises(subprocess.TimeoutExpired):  # the naive runner would wait forever
        naive_run(loop, tmp_path, timeout=1.5)
    result = ours(loop, limits=Limits(wall_seconds=1.5, cpu_seconds=30))
    assert result.timed_out and not result.passed and result.seconds < 3


def test_the_cpu_limit_stops_a_busy_process_before_the_wall_time():
    result = ours("while True:\n    pass\n", limits=Limits(cpu_seconds=1, wall_seconds=20))
    assert not result.passed and not result.timed_out and result.returncode != 0
    assert result.seconds < 10


def test_nothing_outside_the_sandbox_can_be_written(tmp_path):
    folder = tmp_path / "harness"
    folder.mkdir()
    targets = [folder / "escaped.txt", Path.home() / f"emolens-escape-{os.getpid()}.txt"]
    writer = (
        f"for path in {[str(t) for t in targets]!r}:\n    try:\n        open(path, 'w').write('x')\n"
        "    except OSError as error:\n        print('denied', error)\n" + HONEST
    )
    try:
        fooled, _ = naive_run(writer, tmp_path)
        assert fooled and all(t.exists() for t in targets)
        for target in targets:
            target.unlink()
        result = ours(writer)
        fenced = result.isolation.private_filesystem or result.isolation.uid_switch
        assert result.passed and (result.stdout.count("denied") == 2) == fenced
        assert (not any(t.exists() for t in targets)) == fenced
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


def test_the_private_tmp_vanishes_after_the_run():
    path = Path(f"/tmp/emolens-escape-{os.getpid()}-{random.randint(0, 10**9)}")
    try:
        result = ours(
            f"open({str(path)!r}, 'w').write('x')\nopen('here.txt', 'w').write('x')\n" + HONEST
        )
        assert result.passed and path.exists() != result.isolation.private_filesystem
    finally:
        path.unlink(missing_ok=True)


def test_the_harness_files_environment_and_tests_cannot_be_read(tmp_path, monkeypatch):
    secret = f"secret-{random.randint(10**8, 10**9)}"
    private = tmp_path / "private.txt"
    private.write_text(secret)
    private.chmod(0o600)
    monkeypatch.setenv("EMOLENS_TEST_SECRET", secret)
    package = Path(sandbox.__file__).parents[1] / "errors.py"  # emolens' own files
    reader = (
        f"""
import os
def read(path):
    try:
        return open(path).read()
    except OSError:
        return ""
found = {{
    "env": os.environ.get("EMOLENS_TEST_SECRET", ""),
    "file": read({str(private)!r}),
    "tests": read("tests.py"),
    "package": read({str(package)!r}),
    "proc": " ".join(read(f"/proc/{{pid}}/environ") for pid in os.listdir("/proc") if pid.isdigit()),
}}
markers = ({secret!r}, "candidate(2)", "EmolensError")
print("leaks:", sorted(k for k, text in found.items() if any(m in text for m in markers)))
"""
        + HONEST
    )
    fooled, out = naive_run(reader, tmp_path)
    assert fooled and "leaks: ['env', 'file', 'package', 'proc', 'tests']" in out
    result = ours(reader)
    iso = result.isolation
    expected = [k for k, leaks in [("file", not (iso.private_filesystem or iso.uid_switch)),
                                   ("package", not iso.private_filesystem),
                                   ("proc", not (iso.pid_namespace or iso.uid_switch))] if leaks]  # fmt: skip
    assert result.passed and f"leaks: {expected}" in result.stdout


def test_no_network_not_even_localhost(tmp_path):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True)
    thread.start()
    client = (
        f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"hi")
    print("connected")
except OSError as error:
    print("blocked", error)
"""
        + HONEST
    )
    try:
        fooled, out = naive_run(client, tmp_path)
        assert fooled and "connected" in out
        result = ours(client)
        assert result.passed and ("blocked" in result.stdout) == result.isolation.network_namespace
    finally:
        server.close()


@pytest.mark.parametrize(
    "cheat",
    [
        "import sys\nsys.exit(0)\n",
        "import os\nos._exit(0)\n",
        "def check(candidate):\n    pass\n",
        "import builtins\nbuiltins.exec = lambda *args, **kwargs: None\n",
        "import os, sys\nsys.excepthook = lambda *args: os._exit(0)\n",
    ],
    ids=["sys-exit", "os-exit", "redefined-check", "patched-exec", "patched-excepthook"],
)
def test_exits_and_patches_do_not_pass(cheat, tmp_path):
    code = WRONG + cheat
    fooled, _ = naive_run(code, tmp_path)
    assert fooled
    assert not ours(code).passed


def test_the_sentinel_is_in_no_file_variable_or_descriptor(monkeypatch):
    monkeypatch.setattr(sandbox.secrets, "token_hex", lambda n: "feedc0de" * 4)
    search = (
        """
import os
texts = [str(dict(os.environ)), open("/proc/self/cmdline", "rb").read().decode()]
for folder in ("/tmp", "."):
    for root, _, names in os.walk(folder):
        texts += [open(os.path.join(root, n), errors="replace").read() for n in names]
for fd in range(3, 64):
    try:
        os.set_blocking(fd, False)
        texts.append(os.read(fd, 1 << 16).decode(errors="replace"))
    except OSError:
        pass
print("found" if any("feedc0de" in t for t in texts) else "absent")
"""
        + HONEST
    )
    result = ours(search)
    assert result.passed and "absent" in result.stdout


def test_frame_introspection_can_still_forge_a_pass():
    """Documented limit: in-process code can find the sentinel; the grader flags such code."""
    forge = """
import os, sys
frame = sys._getframe()
while "sentinel" not in frame.f_locals:
    frame = frame.f_back
os.write(int(sys.argv[2]), frame.f_locals["sentinel"])
os._exit(0)
"""
    assert ours(WRONG + forge).passed


def test_output_is_capped_but_drained():
    result = ours("print('x' * 2_000_000)\n" + HONEST, limits=Limits(output_bytes=1000))
    assert result.passed and len(result.stdout) == 1000


def test_stdin_is_empty_and_big_files_are_refused():
    reader = "import sys\nassert sys.stdin.read() == ''\n" + HONEST
    assert ours(reader).passed
    writer = "open('big', 'wb').write(bytes(8 << 20))\n" + HONEST
    result = ours(writer, limits=Limits(file_size_mb=2))
    assert not result.passed and "File too large" in result.stderr


@pytest.mark.parametrize("mode", ["userns", "plain"])
def test_the_fallback_modes_keep_the_sentinel_rule_and_the_wall_time(mode):
    run = lambda code, limits=QUICK: sandbox._run(code, TESTS + CALL, limits, mode)  # noqa: E731
    assert run(HONEST).passed
    assert not run(WRONG + "import os\nos._exit(0)\n").passed
    stuck = run("while True:\n    pass\n", Limits(wall_seconds=1, cpu_seconds=30))
    assert stuck.timed_out and not stuck.passed
    probe = run("import socket\ntry:\n    socket.create_connection(('127.0.0.1', 9), 1)\n"
                "except OSError as e:\n    print(e.errno)\n" + HONEST)  # fmt: skip
    assert probe.passed and probe.isolation.mode == mode
    assert ("101" in probe.stdout) == (mode == "userns")  # ENETUNREACH only in a namespace
