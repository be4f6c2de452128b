"""Tests for picochat.sandbox: real child processes, real files, a real listening socket.

    OMP_NUM_THREADS=1 .venv/bin/pytest -x -q tests/test_sandbox.py
"""

import ast
import functools
import glob
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

from picochat.common import UserError
from picochat.sandbox import _probe_bwrap, _remove_tree, run_python

# Re-importing a builtin module gives back its original functions: the documented way around the Python-level guards.
# Tests use it to check the layers that must hold without the guards (rlimits, process group, netns, Landlock).
UNGUARDED_POSIX = "import sys\ndel sys.modules['posix']\nimport posix\n"


@pytest.fixture(autouse=True, params=["auto", "fallback"])
def mode(request, monkeypatch):
    """Every test runs under both isolation paths: bubblewrap where it works ("auto") and the layers the child sets
    up itself ("fallback", forced by PICOCHAT_SANDBOX)."""
    monkeypatch.setenv("PICOCHAT_SANDBOX", request.param)
    return request.param


_HOST_PROBES = {  # each exits 0 where this kernel/container allows the layer at all
    "seccomp": "import sys; sys.exit('Seccomp:' not in open('/proc/self/status').read())",
    "landlock": "import ctypes, sys; c = ctypes.CDLL(None); c.syscall.restype = ctypes.c_long; "
                "sys.exit(c.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1)) < 1)",
    "mountns": "import ctypes, sys; c = ctypes.CDLL(None); "
               "sys.exit(c.unshare(0x10020000) != 0 and c.unshare(0x20000) != 0)",  # NEWUSER|NEWNS, else NEWNS
}


@functools.cache
def host_can(layer: str) -> bool:
    """Whether the host allows `layer`, checked outside the sandbox, so that a sandbox that fails to use a layer the
    host has fails the test instead of skipping it."""
    if not sys.platform.startswith("linux"):
        return False
    if layer == "bwrap":
        argv = [shutil.which("bwrap") or "bwrap", "--unshare-user", "--unshare-pid", "--ro-bind", "/", "/", "true"]
    else:
        argv = [sys.executable, "-c", _HOST_PROBES[layer]]
    try:
        return subprocess.run(argv, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def needs_host(*layers: str) -> None:
    """Skip where the host allows none of `layers` (old kernels, locked-down containers)."""
    if not any(host_can(x) for x in layers):
        pytest.skip(f"this host allows none of {layers}")


def survivors(marker: str) -> list[int]:
    """Live processes whose command line holds `marker` (every process of a run has the work dir in its argv)."""
    found = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            with open(f"{d}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        pid = int(d.rsplit("/", 1)[1])
        if marker.encode() in cmdline and pid != os.getpid() and pid_alive(pid):
            found.append(pid)
    return found


def assert_still_works() -> None:
    """After any failure the sandbox must be reusable."""
    r = run_python("print(1+1)", timeout_s=2)
    assert (r.status, r.stdout, r.stderr, r.returncode) == ("ok", "2\n", "", 0)


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (killed, waiting to be reaped by init) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_stdout_captured_exactly_and_stdin():
    r = run_python("print('hello')\nprint(6 * 7, end='!')\nimport sys\nprint(sys.stdin.read().upper())",
                   stdin="abc\ndef")
    assert r.status == "ok" and r.ok
    assert r.returncode == 0
    assert r.stdout == "hello\n42!ABC\nDEF\n"
    assert r.stderr == ""
    assert 0 < r.duration_s < 5


def test_a_final_expression_is_echoed_like_a_notebook_cell():
    # the model's calls are mostly one expression, 'strawberry'.count('r'): without the echo its value was lost and
    # the tool answered "" where training (the calculator's output) showed the count
    r = run_python("\" strawberry\".count(\"r\")")
    assert (r.status, r.stdout) == ("ok", "3\n")
    assert run_python("x = 6\nprint('x is', x)\nx * 7").stdout == "x is 6\n42\n"
    assert run_python("'abc'.upper()").stdout == "'ABC'\n"  # the repr, as Python's prompt shows it
    assert run_python("print('once')").stdout == "once\n"  # a None value is not shown
    assert run_python("for i in range(2):\n    i").stdout == ""  # only a final top-level expression
    r = run_python("x = 1\nx / 0")
    assert r.status == "error" and 'File "main.py", line 2' in r.stderr and "sandbox" not in r.stderr


def test_exception_is_an_error_result_with_a_clean_traceback():
    r = run_python("x = 1\ny = x / 0\n")
    assert r.status == "error" and not r.ok
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == "ZeroDivisionError: division by zero"
    assert 'File "main.py", line 2' in r.stderr
    assert "sandbox.py" not in r.stderr  # the sandbox's own frames are hidden
    r = run_python("def f(:\n")
    assert r.status == "error" and "SyntaxError" in r.stderr
    r = run_python("import sys\nsys.exit(3)")  # same exit code as a MemoryError, but no MemoryError: not "memory"
    assert (r.status, r.returncode) == ("error", 3)
    assert_still_works()


def test_infinite_loop_times_out_and_nothing_of_it_is_left():
    r = run_python("import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    pass\n", timeout_s=1.0)
    assert r.status == "timeout"
    assert 1.0 <= r.duration_s < 2.0
    workdir = r.stdout.split()[0]  # output written before the kill is kept
    assert workdir.startswith(os.path.join(tempfile.gettempdir(), "picochat_sandbox_"))
    assert survivors(workdir) == []
    assert_still_works()


def test_memory_limit():
    r = run_python("b = bytearray(2 * 1024**3)\nprint('allocated')", memory_mb=256)
    assert r.status == "memory"
    assert "MemoryError" in r.stderr
    assert "allocated" not in r.stdout
    assert_still_works()


def test_writes_outside_the_working_directory_fail_and_the_directory_is_removed():
    target = os.path.join(tempfile.gettempdir(), f"picochat_escape_test_{uuid.uuid4().hex}")
    name = os.path.basename(target)
    attempts = [
        f"open({target!r}, 'w').write('x')",
        f"open('../{name}', 'w').write('x')",  # the parent of the sandbox's temp dir is tempfile.gettempdir()
        f"import os\nos.close(os.open({target!r}, os.O_CREAT | os.O_WRONLY))",
        f"import pathlib\npathlib.Path({target!r}).write_text('x')",
    ]
    for code in attempts:
        r = run_python(code)
        assert r.status == "error" and "PermissionError" in r.stderr, code
        assert not os.path.exists(target), code

    # Inside the working directory files work, and the directory is deleted afterwards.
    r = run_python("import os\nopen('a.txt', 'w').write('kept')\nprint(open('a.txt').read(), os.getcwd())\n"
                   "os.mkdir('d')\nopen('d/f', 'w').write('x')\nos.chmod('d', 0o500)")  # cleanup must cope
    assert r.status == "ok"
    text, cwd = r.stdout.split()
    assert text == "kept"
    assert os.path.basename(cwd).startswith("picochat_sandbox_")
    assert not os.path.exists(cwd)
    assert_still_works()


def test_writes_outside_are_denied_without_the_python_guards():
    target = os.path.join(tempfile.gettempdir(), f"picochat_escape_test_{uuid.uuid4().hex}")
    r = run_python(f"import _io\n_io.FileIO({target!r}, 'w').write(b'x')")  # _io.FileIO is not guarded
    if "landlock" not in r.layers:
        pytest.skip("Landlock is not available on this kernel: only the Python-level guards stop writes")
    assert r.status == "error" and "PermissionError" in r.stderr
    assert not os.path.exists(target)


def test_subprocesses_fail():
    for code in ("import subprocess\nsubprocess.run(['echo', 'hi'])", "import os\nos.system('echo hi')",
                 "import os\nprint(os.fork())", "import os\nos.kill(1, 0)\nprint('hi')"):
        r = run_python(code)
        assert r.status == "error" and "PermissionError" in r.stderr, code
        assert "hi" not in r.stdout
    assert_still_works()


def test_large_output_is_truncated_quickly():
    t0 = time.monotonic()
    r = run_python("print('x' * 1_000_000)", max_output_bytes=4096)
    assert time.monotonic() - t0 < 3
    assert r.status == "output_limit" and r.truncated
    assert r.stdout == "x" * 4096
    # An endless stream stops at the limit too, long before the timeout.
    t0 = time.monotonic()
    r = run_python("while True:\n    print('y' * 1000)", timeout_s=20, max_output_bytes=10_000)
    assert time.monotonic() - t0 < 3
    assert r.status == "output_limit" and len(r.stdout) == 10_000 and set(r.stdout) <= {"y", "\n"}
    assert_still_works()


def test_no_network_even_to_localhost():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        r = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
        assert r.status == "error" and "PermissionError" in r.stderr
        r = run_python(f"import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n"
                       "print('connected')")
        if not {"netns", "landlock"} & set(r.layers):
            pytest.skip("no network namespace or Landlock here: only the Python-level guard blocks sockets")
        assert r.status == "error" and "connected" not in r.stdout
        assert r.stderr.strip().splitlines()[-1].split(":")[0] in ("PermissionError", "OSError", "TimeoutError")
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody ever reached the server
    finally:
        server.close()
    assert_still_works()


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("PICOCHAT_TEST_SECRET", "hunter2")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("PYTHONPATH", "/nonexistent")
    r = run_python("import os, sys\nprint(sorted(os.environ))\nprint(os.environ.get('PICOCHAT_TEST_SECRET'))\n"
                   "print('/nonexistent' in sys.path)")
    assert r.status == "ok"
    names, secret, in_path = r.stdout.splitlines()
    expected = {"HOME", "LANG", "PATH", "TMPDIR"} | ({"LD_LIBRARY_PATH"} & set(os.environ))
    assert set(ast.literal_eval(names)) == expected
    assert (secret, in_path) == ("None", "False")


def test_signals_to_outside_processes_are_denied():
    code = UNGUARDED_POSIX + f"posix.kill({os.getpid()}, 0)\nprint('reached')"  # signal 0: harmless if it got through
    r = run_python(code)
    if "landlock" not in r.layers:
        pytest.skip("Landlock signal scoping (ABI 6, Linux 6.12) is not available here")
    assert r.status == "error" and "reached" not in r.stdout
    # Landlock refuses it (EPERM); in a PID namespace the outside pid does not even exist (ESRCH)
    assert r.stderr.strip().splitlines()[-1].split(":")[0] in ("PermissionError", "ProcessLookupError")


def test_caller_errors_raise():
    with pytest.raises(ValueError):
        run_python("print(1)", timeout_s=0)
    with pytest.raises(ValueError):
        run_python("print(1)", memory_mb=1)
    with pytest.raises(TypeError):
        run_python(b"print(1)")


def test_stdlib_is_usable_despite_the_guards():
    code = ("import logging, uuid, json, tempfile, asyncio\n"
            "with tempfile.NamedTemporaryFile('w') as f:\n"
            "    f.write('x')\n"
            "print(json.dumps([uuid.uuid4().version, asyncio.run(asyncio.sleep(0, 'async ok'))]))")
    r = run_python(code)
    assert (r.status, r.stdout) == ("ok", '[4, "async ok"]\n')


# ---------------------------------------------------------------------------------------------------------------------
# probes: each got through before the sandbox had a PID/mount namespace, seccomp and Landlock read rules


def test_host_unix_socket_by_path_is_unreachable(mode):
    sock_dir = tempfile.mkdtemp(prefix="picochat_probe_sock_")  # outside any run's work dir
    path = os.path.join(sock_dir, "agent.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(4)
    server.setblocking(False)
    try:
        r = run_python(f"import _socket\ns = _socket.socket(_socket.AF_UNIX)\ns.settimeout(1)\ns.connect({path!r})\n"
                       "print('connected')", timeout_s=3)
        needs_host("seccomp", *(["bwrap"] if mode == "auto" else []))
        assert r.status == "error" and "connected" not in r.stdout
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody reached the socket
    finally:
        server.close()
        os.unlink(path)
        os.rmdir(sock_dir)


def _read_probe(path: str):
    # _io.FileIO is not behind the Python-level guards, so only the OS-level layers can stop it
    return run_python(f"import _io\nprint(_io.FileIO({path!r}).read(200))", timeout_s=3)


def test_system_files_are_unreadable(mode):
    r = _read_probe("/etc/passwd")
    needs_host("landlock", *(["bwrap"] if mode == "auto" else []))
    assert r.status == "error" and "root:" not in r.stdout
    assert r.stderr.strip().splitlines()[-1].split(":")[0] in ("PermissionError", "FileNotFoundError")


def test_files_under_home_are_unreadable(mode):
    secret = f"picochat-secret-{uuid.uuid4().hex}"
    path = os.path.join(os.path.expanduser("~"), f".picochat_probe_{uuid.uuid4().hex}")
    with open(path, "w") as f:
        f.write(secret)
    try:
        r = _read_probe(path)
    finally:
        os.unlink(path)
    needs_host("landlock", *(["bwrap"] if mode == "auto" else []))
    assert r.status == "error" and secret not in r.stdout


def test_another_runs_code_is_unreadable(mode):
    marker = f"picochat-marker-{uuid.uuid4().hex}"
    other = threading.Thread(target=run_python, args=(f"# {marker}\nimport time\ntime.sleep(30)",),
                             kwargs={"timeout_s": 1.5})
    other.start()
    try:
        deadline, found = time.monotonic() + 1.2, None
        while found is None and time.monotonic() < deadline:
            for p in glob.glob(os.path.join(tempfile.gettempdir(), "picochat_sandbox_*", "main.py")):
                try:
                    with open(p) as f:
                        found = p if marker in f.read() else None
                except OSError:
                    continue
                if found:
                    break
            time.sleep(0.01)
        assert found, "the other run's main.py never appeared"
        r = _read_probe(found)
        needs_host("landlock", *(["bwrap"] if mode == "auto" else []))
        assert r.status == "error" and marker not in r.stdout
    finally:
        other.join()


def test_no_new_processes_even_as_root(mode):
    # As root the kernel does not enforce RLIMIT_NPROC; 20 forks must still all fail.
    code = UNGUARDED_POSIX + (
        "n = 0\n"
        "for _ in range(20):\n"
        "    try:\n"
        "        pid = posix.fork()\n"
        "    except OSError:\n"
        "        continue\n"
        "    if pid == 0:\n"
        "        posix._exit(0)\n"
        "    posix.waitpid(pid, 0)\n"
        "    n += 1\n"
        "print('forked', n)\n"
    )
    r = run_python(code, timeout_s=5)
    if os.geteuid() == 0:
        needs_host("seccomp")  # for other users RLIMIT_NPROC = 0 already refuses
    assert (r.status, r.stdout) == ("ok", "forked 0\n")


def test_a_setsid_helper_dies_with_the_run(mode):
    # A helper that leaves the process group (setsid) escapes a group kill; nothing of the run may outlive it.
    code = UNGUARDED_POSIX + (
        "import os, time\n"
        "print(os.getcwd(), flush=True)\n"
        "try:\n"
        "    pid = posix.fork()\n"
        "except OSError as e:\n"
        "    print('fork refused', e.errno, flush=True)\n"
        "else:\n"
        "    if pid == 0:\n"
        "        posix.setsid()\n"
        "        time.sleep(60)\n"
        "        posix._exit(0)\n"
        "    print('helper', pid, flush=True)\n"
    )
    t0 = time.monotonic()
    r = run_python(code, timeout_s=5)
    assert time.monotonic() - t0 < 3  # did not wait for the helper
    workdir = r.stdout.split()[0]
    assert workdir.startswith(os.path.join(tempfile.gettempdir(), "picochat_sandbox_"))
    needs_host("seccomp", *(["bwrap"] if mode == "auto" else []))
    assert survivors(workdir) == []  # right after run_python returned, not eventually


def test_cleanup_does_not_follow_a_symlink_swapped_in_during_it(mode):
    # A process still running in the sandbox during the clean-up swaps a directory the clean-up is inside for a
    # symlink to an outside directory and keeps the real one non-empty, so that removing it fails: a clean-up that
    # then fixes permissions by path chmods (and removes) the outside directory instead.
    outside = tempfile.mkdtemp(prefix="picochat_probe_outside_")
    victim = os.path.join(outside, "d")
    os.mkdir(victim, 0o555)
    code = UNGUARDED_POSIX + (
        "import os, time\n"
        "os.makedirs('a/d')\n"
        "for i in range(3000):\n"
        "    open(f'a/d/f{i}', 'w').close()\n"
        "fd = os.open('a/d', os.O_RDONLY)\n"
        "try:\n"
        "    pid = posix.fork()\n"
        "except OSError as e:\n"
        "    print('fork refused', flush=True)\n"
        "    raise SystemExit\n"
        "if pid:\n"
        "    print('helper', flush=True)\n"
        "    raise SystemExit\n"
        "posix.setsid()\n"
        "posix.close(1)\n"
        "posix.close(2)\n"
        "end = time.monotonic() + 5\n"
        "while len(os.listdir(fd)) >= 3000 and time.monotonic() < end:\n"
        "    pass\n"
        "posix.rename('a', 'moved')\n"
        f"posix.symlink({outside!r}, 'a')\n"
        "for i in range(20000):\n"
        "    posix.close(posix.open(f'n{i}', posix.O_CREAT | posix.O_WRONLY, dir_fd=fd))\n"
        "posix._exit(0)\n"
    )
    try:
        r = run_python(code, timeout_s=5)
        assert r.status == "ok", r.stderr
        needs_host("seccomp", *(["bwrap"] if mode == "auto" else []))
        time.sleep(0.5)  # let a survivor finish what it started
        assert os.path.isdir(victim)
        assert stat.S_IMODE(os.stat(victim).st_mode) == 0o555
    finally:
        os.chmod(victim, 0o755) if os.path.isdir(victim) else None
        for root, dirs, files in os.walk(outside, topdown=False):
            for n in files:
                os.unlink(os.path.join(root, n))
            for n in dirs:
                os.rmdir(os.path.join(root, n))
        os.rmdir(outside)


def test_total_disk_quota(mode):
    # Each file stays under RLIMIT_FSIZE (16 MiB); together they pass the work dir's quota (32 MiB by default).
    code = ("import errno\n"
            "total = 0\n"
            "try:\n"
            "    for i in range(12):\n"
            "        with open(f'f{i}', 'wb') as f:\n"
            "            for _ in range(8):\n"
            "                f.write(b'x' * 1024 * 1024)\n"
            "                total += 1\n"
            "except OSError as e:\n"
            "    print('refused', errno.errorcode[e.errno], total)\n"
            "else:\n"
            "    print('wrote', total)\n")
    r = run_python(code, timeout_s=5)
    assert r.status == "ok", r.stderr
    needs_host("mountns", *(["bwrap"] if mode == "auto" else []))
    verdict, *rest = r.stdout.split()
    assert verdict == "refused" and rest[0] in ("ENOSPC", "EDQUOT"), r.stdout
    assert int(rest[1]) <= 32  # MiB written before the refusal


# ---------------------------------------------------------------------------------------------------------------------
# which layers held, and the choice between bubblewrap and the fallback


def test_layers_name_what_held(mode):
    r = run_python("print(1)")
    known = {"bwrap", "userns", "pidns", "netns", "mountns", "rlimits", "landlock", "seccomp"}
    assert r.ok and "rlimits" in r.layers and set(r.layers) <= known, r.layers
    if mode == "fallback":
        assert "bwrap" not in r.layers and "pidns" not in r.layers
    elif _probe_bwrap(shutil.which("bwrap") or ""):  # runs/setup.sh and .ci/run install it where apt is available
        assert {"bwrap", "pidns", "netns", "mountns"} <= set(r.layers), r.layers
        r = run_python("import os\nprint(os.getpid(), os.getuid())")
        assert r.stdout == "2 65534\n"  # bubblewrap's init is pid 1 of the namespace; the user is nobody


def test_a_bad_sandbox_choice_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("PICOCHAT_SANDBOX", "docker")
    with pytest.raises(UserError, match="PICOCHAT_SANDBOX='docker' is not one of auto, bwrap, fallback"):
        run_python("print(1)")


def test_a_bwrap_that_cannot_run_is_not_chosen():
    assert _probe_bwrap("/bin/false") is None  # exits 1 without running anything: the fallback is used
    assert _probe_bwrap("") is None


def test_clean_up_of_a_hostile_tree_stays_inside(tmp_path):
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "keep.txt").write_text("x")
    os.chmod(outside / "sub", 0o555)
    work = tmp_path / "work"
    (work / "a" / "b").mkdir(parents=True)
    (work / "a" / "b" / "f").write_text("x")
    os.symlink(outside, work / "a" / "link")
    os.symlink(outside / "sub", work / "a" / "b" / "sublink")
    os.chmod(work / "a" / "b", 0o000)
    os.chmod(work / "a", 0o500)
    _remove_tree(str(work))
    assert not os.path.lexists(work)
    assert (outside / "keep.txt").read_text() == "x"
    assert stat.S_IMODE(os.stat(outside / "sub").st_mode) == 0o555


def test_signals_reach_only_the_run_itself():
    # kill(-1, sig) signals every process the sender may signal: from a uid shared with the host (the fallback's
    # user namespace maps the caller's own uid) that would be every process of that uid.
    code = UNGUARDED_POSIX + (
        "import os, signal\n"
        "got = []\n"
        "signal.signal(signal.SIGUSR1, lambda *a: got.append(1))\n"
        "posix.kill(os.getpid(), signal.SIGUSR1)\n"
        "signal.raise_signal(signal.SIGUSR1)\n"
        "print(len(got))\n"
        "posix.kill(-1, 0)\n"
        "print('reached')\n"
    )
    r = run_python(code)
    assert r.stdout == "2\n" and r.status == "error"
    assert r.stderr.strip().splitlines()[-1].startswith("PermissionError")


def test_threads_work_within_the_limits():
    # seccomp refuses processes, not threads (they share RLIMIT_AS); HumanEval-style code may use a thread pool
    code = ("from concurrent.futures import ThreadPoolExecutor\n"
            "with ThreadPoolExecutor(4) as ex:\n"
            "    print(sum(ex.map(lambda x: x * x, range(10))))\n")
    r = run_python(code)
    needs_host("seccomp")  # without it RLIMIT_NPROC = 0 refuses threads too (for users other than root)
    assert (r.status, r.stdout) == ("ok", "285\n"), r.stderr
