"""Run untrusted Python (model tool calls, HumanEval completions) in a limited child process.

    from picochat.sandbox import run_python
    r = run_python("print(6*7)", timeout_s=2)      # ExecResult(stdout='42\\n', status='ok', ...)

This file is also the child's entry point: `run_python` starts `python -I -S -B -u -X utf8 picochat/sandbox.py CONFIG`,
which sets up the limits below, then executes the user's code as `__main__`. Do not run it by hand.

What contains the child (the parts meant to hold against code written to escape, kernel bugs aside):
  * a fresh temporary working directory, deleted afterwards, and a scrubbed environment (PATH, HOME=TMPDIR=workdir,
    LANG; no proxies, tokens or PYTHONPATH; `-I -S` ignores PYTHON* variables and site-packages: stdlib only);
  * its own session/process group, SIGKILLed as a whole on timeout, on too much output, and when the child exits
    (so forked helpers die with it); a wall-clock timeout plus RLIMIT_CPU;
  * rlimits set before the user's code runs, soft = hard so it cannot raise them again (CPU: hard = soft + 1 s):
    RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE (16 MiB files), RLIMIT_NPROC = 0 (no new processes or threads;
    NOTE the kernel does not enforce RLIMIT_NPROC for uid 0, so when picochat runs as root only the guards and the
    group kill stop forks), RLIMIT_NOFILE, RLIMIT_CORE = 0;
  * on Linux, where the kernel allows it without root: a new user + network namespace (only a down loopback, so no
    connection anywhere, 127.0.0.1 included; the user namespace also drops root's host capabilities), and Landlock
    (kernel >= 5.13): no file creation/writing/removal outside the working directory (plus /dev/null), no execve,
    no TCP bind/connect (ABI >= 4), no signals to processes outside the sandbox (ABI >= 6). Without Landlock only
    the guards below keep the code from writing wherever the account running picochat may write.
  ExecResult.layers lists which of "rlimits", "netns", "landlock" took effect, so callers can log it.

Defence in depth only, NOT a security boundary: the child replaces os.system/fork/exec*/kill, subprocess.Popen,
socket creation and file writes outside the working directory with functions that raise PermissionError. Code that
means to escape can undo these (e.g. by re-importing a builtin module). They exist so that ordinary model mistakes
fail with a clear message, and so that hosts without namespaces or Landlock (macOS, old kernels) still get something.
Do not run code from an adversary on a machine or account you are not prepared to lose.

Cost: ~0.12-0.2 s per call on a shared 2-core machine (interpreter start plus the setup above), measured here.

Why no `preexec_fn`: the Python docs warn it is unsafe in a process with threads (the web server and torch both have
them), and without it Popen can use vfork, which keeps spawning cheap from a parent holding GBs of model weights.
Everything is therefore set up by the child itself before the user's code runs.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# The child exits with this code when the user's code died of MemoryError (RLIMIT_AS), so the parent can report
# "memory" even when stderr was truncated. 3 is not used by the interpreter itself (it uses 1, 2 and 120).
_MEMORY_EXIT = 3
_MAX_FILE_BYTES = 16 * 1024 * 1024
_MAX_OPEN_FILES = 256
_LAYERS_FILE = ".picochat_sandbox_layers.json"
# After the child exits, how long to keep reading pipes that a setsid()-escaped grandchild might still hold open.
_DRAIN_GRACE_S = 0.5


@dataclass
class ExecResult:
    """Outcome of one run. `status` is exactly one of:

    "ok"            exit status 0
    "error"         non-zero exit: an exception (traceback in stderr), sys.exit(n), or a signal other than below
    "timeout"       killed after timeout_s of wall-clock time, or by RLIMIT_CPU (SIGXCPU)
    "memory"        MemoryError under RLIMIT_AS, or SIGKILLed by the kernel's OOM killer
    "output_limit"  stdout or stderr passed max_output_bytes: the group was killed and the output cut there

    stdout/stderr are decoded as UTF-8 (bad bytes replaced); `truncated` says they were cut at max_output_bytes.
    returncode is the child's exit status (negative = killed by that signal), None if it could not be collected.
    """

    stdout: str
    stderr: str
    status: str
    returncode: int | None
    duration_s: float
    truncated: bool = False
    layers: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_python(
    code: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 256,
    max_output_bytes: int = 16_384,
    stdin: str | None = None,
) -> ExecResult:
    """Run `code` as a Python script in a fresh sandboxed child; never raises because of what `code` does.

    max_output_bytes applies to stdout and stderr separately. Raises TypeError/ValueError for bad arguments (caller
    bugs) and OSError only if the interpreter itself cannot be started.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if stdin is not None and not isinstance(stdin, str):
        raise TypeError(f"stdin must be a str or None, got {type(stdin).__name__}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if memory_mb < 64:  # the interpreter plus ctypes needs ~40 MB of address space before any user code runs
        raise ValueError(f"memory_mb must be >= 64, got {memory_mb}")
    if max_output_bytes < 1:
        raise ValueError(f"max_output_bytes must be >= 1, got {max_output_bytes}")
    if os.name != "posix":
        raise RuntimeError("picochat's sandbox needs a POSIX system (Linux or macOS) for rlimits and sessions")

    workdir = os.path.realpath(tempfile.mkdtemp(prefix="picochat_sandbox_"))
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        config = {
            "workdir": workdir,
            "memory_bytes": memory_mb * 1024 * 1024,
            # a backstop only: the parent enforces the wall clock itself, which a sleeping child does not burn
            "cpu_s": int(timeout_s) + 2,
        }
        return _spawn_and_collect(workdir, config, timeout_s, max_output_bytes, stdin)
    finally:
        _remove_tree(workdir)


# ---------------------------------------------------------------------------------------------------------------------
# parent side


def _child_env(workdir: str) -> dict[str, str]:
    """Only what the interpreter needs: nothing inherited except LD_LIBRARY_PATH (some Python builds need it)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    if "LD_LIBRARY_PATH" in os.environ:
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    return env


def _spawn_and_collect(
    workdir: str, config: dict, timeout_s: float, max_output_bytes: int, stdin: str | None
) -> ExecResult:
    argv = [sys.executable, "-I", "-S", "-B", "-u", "-X", "utf8", os.path.abspath(__file__), json.dumps(config)]
    # stdin goes through an unlinked temp file, not a pipe: no writer thread, no deadlock if the child never reads
    stdin_file = tempfile.TemporaryFile() if stdin is not None else None
    if stdin_file is not None:
        stdin_file.write(stdin.encode("utf-8"))
        stdin_file.seek(0)
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=_child_env(workdir),
            start_new_session=True,  # pgid == pid: one killpg reaches everything it forks
            close_fds=True,
        )
    finally:
        if stdin_file is not None:
            stdin_file.close()
    try:
        out, err, reason = _collect(proc, t0 + timeout_s, max_output_bytes)
    finally:
        _kill_group(proc.pid)  # no-op when already gone; pid cannot be reused before proc.wait() below reaps it
        proc.stdout.close()
        proc.stderr.close()
        returncode = proc.wait()
    duration = time.monotonic() - t0

    truncated = reason == "output_limit"
    if reason is not None:
        status = reason
    elif returncode == 0:
        status = "ok"
    elif (returncode == _MEMORY_EXIT and b"MemoryError" in err) or returncode == -signal.SIGKILL:
        status = "memory"  # SIGKILL that we did not send comes from the OOM killer
    elif returncode == -getattr(signal, "SIGXCPU", -1000):
        status = "timeout"
    else:
        status = "error"
    return ExecResult(
        stdout=out[:max_output_bytes].decode("utf-8", errors="replace"),
        stderr=err[:max_output_bytes].decode("utf-8", errors="replace"),
        status=status,
        returncode=returncode,
        duration_s=duration,
        truncated=truncated,
        layers=_read_layers(workdir),
    )


def _collect(proc: subprocess.Popen, deadline: float, max_output_bytes: int) -> tuple[bytes, bytes, str | None]:
    """Read stdout/stderr as they come until the child exits; returns (out, err, "timeout"|"output_limit"|None).

    Reading incrementally is what lets 1 MB of output stop after max_output_bytes instead of being buffered.
    """
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    # A pidfd becomes readable when the child exits, so exit is noticed at once; elsewhere poll every 20 ms.
    pidfd = os.pidfd_open(proc.pid) if hasattr(os, "pidfd_open") else None
    if pidfd is not None:
        sel.register(pidfd, selectors.EVENT_READ)
    reason = None
    try:
        exited = False
        while not exited and reason is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = "timeout"
                break
            for key, _ in sel.select(timeout=remaining if pidfd is not None else min(remaining, 0.02)):
                if key.fd == pidfd:
                    exited = True
                else:
                    _read_into(sel, key.fd, bufs[key.fd])
            if any(len(b) > max_output_bytes for b in bufs.values()):
                reason = "output_limit"
            elif pidfd is None:
                exited = _has_exited(proc)
        # Kill the group before draining, so helpers it forked cannot keep the pipes open or keep writing.
        _kill_group(proc.pid)
        if pidfd is not None:
            sel.unregister(pidfd)  # stays readable from now on: keeping it would make the drain loop spin
        grace_end = time.monotonic() + _DRAIN_GRACE_S
        while reason != "output_limit" and sel.get_map() and time.monotonic() < grace_end:
            for key, _ in sel.select(timeout=max(0.0, grace_end - time.monotonic())):
                _read_into(sel, key.fd, bufs[key.fd])
            if any(len(b) > max_output_bytes for b in bufs.values()):
                reason = "output_limit"
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
    out, err = bufs[proc.stdout.fileno()], bufs[proc.stderr.fileno()]
    return bytes(out), bytes(err), reason


def _read_into(sel: selectors.BaseSelector, fd: int, buf: bytearray) -> None:
    """Append what is available on `fd`; at EOF stop watching it."""
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        return
    if chunk:
        buf += chunk
    else:
        sel.unregister(fd)


def _has_exited(proc: subprocess.Popen) -> bool:
    """True once the child has exited, without reaping it (WNOWAIT keeps its pid, and so its group id, reserved)."""
    if hasattr(os, "waitid"):
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    # No waitid (macOS before Python 3.13): poll() reaps and records the status; the group is killed right after.
    return proc.poll() is not None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group has already exited
        pass
    except PermissionError:
        # macOS answers EPERM for a group whose members are all zombies; there is nothing left to kill
        pass


def _read_layers(workdir: str) -> tuple[str, ...]:
    """Which isolation layers the child reported before running the user's code (informational: the code could
    have rewritten the file)."""
    try:
        with open(os.path.join(workdir, _LAYERS_FILE), encoding="utf-8") as f:
            layers = json.load(f)
    except (OSError, ValueError):
        return ()
    return tuple(x for x in layers if isinstance(x, str)) if isinstance(layers, list) else ()


def _remove_tree(path: str) -> None:
    """Delete the working directory even if the code chmod-ed parts of it read-only."""

    def fix_and_retry(func, p, _exc):
        # The usual cause is a directory without write/search permission. Never chmod through a symlink: its
        # target may be outside the working directory.
        for q in (os.path.dirname(p), p):
            if os.path.isdir(q) and not os.path.islink(q):
                os.chmod(q, 0o700)
        func(p)

    try:
        shutil.rmtree(path, onerror=fix_and_retry)
    except OSError as e:
        print(f"picochat.sandbox: warning: could not remove temporary directory {path}: {e}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------------
# child side: runs in the sandboxed interpreter, stdlib only, before any user code


def _child_main(argv: list[str]) -> None:
    import builtins
    import traceback
    import types

    config = json.loads(argv[0])
    workdir = config["workdir"]
    layers = []
    if _child_rlimits(config):
        layers.append("rlimits")
    if sys.platform.startswith("linux"):
        # Both use ctypes, which the guards then hide from the user's code.
        if _child_unshare_network():
            layers.append("netns")
        if _child_landlock(workdir):
            layers.append("landlock")
    with open(os.path.join(workdir, _LAYERS_FILE), "w", encoding="utf-8") as f:
        json.dump(layers, f)
    _child_guards(workdir)

    main_path = os.path.join(workdir, "main.py")
    with open(main_path, encoding="utf-8") as f:
        source = f.read()
    module = types.ModuleType("__main__")
    module.__file__ = main_path
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    sys.argv = ["main.py"]
    try:
        exec(compile(source, "main.py", "exec"), module.__dict__)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - report every failure of the user's code as Python would, then exit
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next  # hide the sandbox's own frames: the traceback should start in main.py
        traceback.print_exception(type(e), e, tb)
        sys.exit(_MEMORY_EXIT if isinstance(e, MemoryError) else 1)


def _child_rlimits(config: dict) -> bool:
    import resource

    # (soft, hard). soft == hard so the user's code cannot raise a limit back, except CPU: at the soft limit the
    # kernel sends SIGXCPU (reported as "timeout"), at the hard one SIGKILL (which would read as the OOM killer).
    wanted = {
        "RLIMIT_AS": (config["memory_bytes"], config["memory_bytes"]),
        "RLIMIT_CPU": (config["cpu_s"], config["cpu_s"] + 1),
        "RLIMIT_FSIZE": (_MAX_FILE_BYTES, _MAX_FILE_BYTES),
        "RLIMIT_NPROC": (0, 0),
        "RLIMIT_NOFILE": (_MAX_OPEN_FILES, _MAX_OPEN_FILES),
        "RLIMIT_CORE": (0, 0),
    }
    for name, (soft, hard) in wanted.items():
        which = getattr(resource, name, None)
        if which is None:
            continue
        _, host_hard = resource.getrlimit(which)
        if host_hard != resource.RLIM_INFINITY:  # never try to raise a limit the host already set lower
            soft, hard = min(soft, host_hard), min(hard, host_hard)
        resource.setrlimit(which, (soft, hard))
    return True


def _child_unshare_network() -> bool:
    """Enter new user + network namespaces (only a down loopback inside). False where the kernel refuses."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    clone_newuser, clone_newnet = 0x10000000, 0x40000000
    if libc.unshare(clone_newuser | clone_newnet) == 0:
        return True
    return libc.unshare(clone_newnet) == 0  # root inside a container that forbids user namespaces


# Landlock constants from <linux/landlock.h>; the syscall numbers are the same on every architecture.
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LL_EXECUTE, _LL_WRITE_FILE = 1 << 0, 1 << 1
# REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM
_LL_MODIFY = sum(1 << i for i in range(4, 13))
_LL_REFER, _LL_TRUNCATE = 1 << 13, 1 << 14  # ABI 2, ABI 3
_LL_NET_BIND_TCP, _LL_NET_CONNECT_TCP = 1, 2  # ABI 4
_LL_SCOPE_ABSTRACT_UNIX, _LL_SCOPE_SIGNAL = 1, 2  # ABI 6


def _child_landlock(workdir: str) -> bool:
    """Forbid writes outside `workdir` (and /dev/null), all execve, TCP, and signals out of the sandbox.

    Reading stays allowed everywhere: the interpreter imports the stdlib from wherever it is installed.
    Returns False where Landlock is missing (old kernel, disabled LSM, seccomp filter).
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return False

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    fs = _LL_EXECUTE | _LL_WRITE_FILE | _LL_MODIFY | (_LL_REFER if abi >= 2 else 0) | (_LL_TRUNCATE if abi >= 3 else 0)
    attr = RulesetAttr(fs, 0, 0)
    size = 8  # the kernel rejects a struct larger than its ABI knows, so pass only the fields this ABI has
    if abi >= 4:
        attr.net, size = _LL_NET_BIND_TCP | _LL_NET_CONNECT_TCP, 16  # no net rule added: all TCP is denied
    if abi >= 6:
        attr.scoped, size = _LL_SCOPE_ABSTRACT_UNIX | _LL_SCOPE_SIGNAL, 24
    ruleset = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return False
    try:
        rules = [(workdir, fs & ~_LL_EXECUTE), ("/dev/null", _LL_WRITE_FILE | (_LL_TRUNCATE if abi >= 3 else 0))]
        for path, allowed in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = PathBeneath(allowed, fd)
                if libc.syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule), 0):
                    return False
            finally:
                os.close(fd)
        pr_set_no_new_privs = 38  # required by landlock_restrict_self for a process without CAP_SYS_ADMIN
        if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
            return False
        return libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) == 0
    finally:
        os.close(ruleset)


def _child_guards(workdir: str) -> None:
    """Python-level guards (see the module docstring: convenience and defence in depth, not a boundary)."""
    import builtins
    import io
    import posix
    import socket

    def blocked(name: str):
        def refuse(*_args, **_kwargs):
            raise PermissionError(f"{name} is disabled in the picochat sandbox")

        return refuse

    def inside(path, dir_fd=None) -> bool:
        if isinstance(path, int):
            return True  # an already-open file descriptor: opening it was checked
        p = os.fsdecode(path)
        base = os.getcwd()
        if dir_fd is not None and not os.path.isabs(p):
            base = os.readlink(f"/proc/self/fd/{dir_fd}")  # shutil.rmtree works relative to directory fds
        real = os.path.realpath(os.path.join(base, p))
        return real == workdir or real.startswith(workdir + os.sep) or real == os.devnull

    def guard_path(name: str, fn, n_paths: int = 1):
        def checked(*args, **kwargs):
            dir_fds = [kwargs.get("dir_fd")] if n_paths == 1 else [kwargs.get("src_dir_fd"), kwargs.get("dst_dir_fd")]
            for p, dir_fd in zip(args[:n_paths], dir_fds):
                if not inside(p, dir_fd):
                    raise PermissionError(f"{name}({p!r}): only the sandbox's working directory may be changed")
            return fn(*args, **kwargs)

        return checked

    real_open, real_os_open = builtins.open, os.open

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"open({file!r}, {mode!r}): only the sandbox's working directory is writable")
        return real_open(file, mode, *args, **kwargs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def os_open_(path, flags, *args, **kwargs):
        if flags & write_flags and not inside(path, kwargs.get("dir_fd")):
            raise PermissionError(f"os.open({path!r}): only the sandbox's working directory is writable")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = open_
    replacements = {"open": os_open_}
    for name in ("remove", "unlink", "rmdir", "mkdir", "truncate", "chmod", "chown", "lchown", "utime", "mkfifo",
                 "mknod"):
        if hasattr(os, name):
            replacements[name] = guard_path(f"os.{name}", getattr(os, name))
    for name in ("rename", "replace", "link", "symlink"):
        replacements[name] = guard_path(f"os.{name}", getattr(os, name), n_paths=2)
    for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "posix_spawn", "posix_spawnp", "execv",
                 "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnvp",
                 "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "setuid", "setgid"):
        if hasattr(os, name):
            replacements[name] = blocked(f"os.{name}")
    for name, fn in replacements.items():
        setattr(os, name, fn)
        if hasattr(posix, name):
            setattr(posix, name, fn)

    subprocess.Popen = blocked("subprocess.Popen")  # run/call/check_output all go through Popen
    subprocess._fork_exec = blocked("subprocess")  # 3.12+ keeps its own reference to fork_exec
    if "_posixsubprocess" in sys.modules:
        sys.modules["_posixsubprocess"].fork_exec = blocked("subprocess")
    real_socket_init = socket.socket.__init__

    def socket_init(self, family=-1, type=-1, proto=-1, fileno=None):
        # Wrapping an existing fd stays allowed: socketpair() does that, and asyncio's event loop needs it.
        if fileno is None:
            raise PermissionError("creating sockets is disabled in the picochat sandbox")
        real_socket_init(self, family, type, proto, fileno)

    socket.socket.__init__ = socket_init  # patch __init__, not the class: ssl subclasses socket.socket at import
    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "create_connection", "create_server"):
        setattr(socket, name, blocked(f"socket.{name}"))
    # ctypes could call libc directly; drop it (the setup above is done with it) and refuse re-imports.
    for name in ("ctypes", "_ctypes", "_posixsubprocess", "multiprocessing"):
        sys.modules[name] = None


if __name__ == "__main__":
    _child_main(sys.argv[1:])
