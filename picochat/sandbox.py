"""Run untrusted Python (model tool calls, HumanEval completions) in a limited child process.

    from picochat.sandbox import run_python
    r = run_python("print(6*7)", timeout_s=2)      # ExecResult(stdout='42\\n', status='ok', layers=(...), ...)

The child is `python -I -S -B -u -X utf8 picochat/sandbox_child.py CONFIG` (the base interpreter, stdlib only), started
inside bubblewrap where that works; sandbox_child.py limits the process and then runs the user's code as `__main__`.
PICOCHAT_SANDBOX=auto (default) | bwrap (required: error if it cannot be used) | fallback (never use bubblewrap).

What contains the child (meant to hold against code written to escape, kernel bugs aside); ExecResult.layers names
the ones that took effect on this run:
  * "bwrap": Debian's bubblewrap (`apt-get install bubblewrap`), probed once per process (one extra run), gives
    "userns" (uid 65534, no capabilities; without it where a root container forbids user namespaces), "pidns"
    (every process of the run dies with it: the parent waits for the namespace's init to be gone), "netns" (only a
    down loopback), "mountns": a read-only root holding only the interpreter, its stdlib and shared libraries,
    /dev/null, /dev/zero, /dev/urandom, the namespace's /proc, a 1 MiB private /tmp and the work dir as a tmpfs of
    `disk_mb` (the disk quota). Without bubblewrap the child makes its own "userns", "netns" and "mountns" (private
    /tmp, work dir tmpfs) where the kernel allows, but no PID namespace and the host's file tree stays mounted.
  * "seccomp": no new processes (fork, or clone without CLONE_THREAD; threads stay allowed, within the memory
    limit), no execve, no socket() of any family (AF_UNIX by path would reach host services such as
    docker.sock), signals only to itself, no ptrace, mount, unshare, setns, io_uring, bpf or pidfds.
  * "landlock" (Linux >= 5.13): reads only from the interpreter's files above, the work dir and those devices;
    writes only in the work dir; no execve; no TCP (ABI >= 4); no signals out of the sandbox (ABI >= 6).
  * "rlimits", soft = hard so the code cannot raise them (CPU: hard = soft + 1 s): RLIMIT_AS (memory), RLIMIT_CPU,
    RLIMIT_FSIZE (16 MiB files), RLIMIT_NOFILE, RLIMIT_CORE = 0, and RLIMIT_NPROC = 0 (no threads either) where
    seccomp is missing (it does not bind root: the filter is what stops forks there); plus a wall-clock timeout after
    which everything is SIGKILLed, a scrubbed environment (PATH, HOME=TMPDIR=work dir, LANG) and a temp work dir
    removed afterwards without ever following a symlink.
  * Python-level guards (os.system/fork/exec*/kill, subprocess, sockets, writes outside the work dir raise
    PermissionError): they make ordinary model mistakes fail clearly; code that means to escape can undo them.

What stays exposed: CPU time up to the limit and memory up to memory_mb (+ disk_mb of tmpfs, which is RAM) per run;
the kernel's system-call surface that the filter allows (a kernel bug is an escape); with bubblewrap the /proc of the
run's own namespace (readable only where Landlock is missing); in the fallback without Landlock, reads of every
file the account may read; where neither seccomp nor namespaces work (macOS, old kernels), only the rlimits, the
process group kill and the guards, which root or a determined attacker gets past. Do not run code from an adversary on
a machine or account you are not prepared to lose.

Cost per call: `python benchmarks/sandbox.py` measures it with bubblewrap and with the fallback (README, Measured).

Why no `preexec_fn`: the Python docs warn it is unsafe in a process with threads (the web server and torch both have
them), and without it Popen can use vfork, which keeps spawning cheap from a parent holding GBs of model weights.
Everything is therefore set up by bubblewrap and the child itself.
"""

from __future__ import annotations

import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass

from picochat import sandbox_child
from picochat.common import UserError

_CHILD = os.path.abspath(sandbox_child.__file__)  # started by path: the child imports nothing from picochat
# After the child exits, how long to keep reading pipes that an escaped helper might still hold open.
_DRAIN_GRACE_S = 0.5
# How long to wait for a killed PID namespace to be empty (the kernel kills and reaps it in milliseconds).
_NAMESPACE_GONE_S = 5.0
_NOBODY = 65534
# One line for help texts (picochat.tools.TOOL_HELP); ExecResult.layers says which of these held on a run.
SANDBOX_SUMMARY = ("no network, sockets or new processes; reads only the stdlib and its own temp dir; CPU, memory, "
                   "disk and time limits; bubblewrap, seccomp and Landlock where available")


@dataclass
class ExecResult:
    """Outcome of one run. `status` is exactly one of:

    "ok"            exit status 0
    "error"         non-zero exit: an exception (traceback in stderr), sys.exit(n), or a signal other than below
    "timeout"       killed after timeout_s of wall-clock time, or by RLIMIT_CPU (SIGXCPU)
    "memory"        MemoryError under RLIMIT_AS, or SIGKILLed by the kernel's OOM killer
    "output_limit"  stdout or stderr passed max_output_bytes: the run was killed and the output cut there

    stdout/stderr are decoded as UTF-8 (bad bytes replaced); `truncated` says they were cut at max_output_bytes.
    returncode is the child's exit status (negative = killed by that signal), None if it could not be collected.
    layers: the isolation layers that took effect (see the module docstring), as the child reported them before
    running the code, plus the namespaces bubblewrap made; empty if the child did not get that far.
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
    disk_mb: int = 32,
) -> ExecResult:
    """Run `code` as a Python script in a fresh sandboxed child; never raises because of what `code` does.

    max_output_bytes applies to stdout and stderr separately; disk_mb bounds all files the code writes together
    (where a mount namespace is available). Raises TypeError/ValueError for bad arguments (caller bugs), UserError
    for a bad PICOCHAT_SANDBOX, and OSError only if the interpreter itself cannot be started.
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
    if disk_mb < 1:
        raise ValueError(f"disk_mb must be >= 1, got {disk_mb}")
    if os.name != "posix":
        raise RuntimeError("picochat's sandbox needs a POSIX system (Linux or macOS) for rlimits and sessions")
    return _run(code, _choose_bwrap(), timeout_s, memory_mb, max_output_bytes, stdin, disk_mb)


def _run(code: str, bwrap: tuple[str, bool] | None, timeout_s: float, memory_mb: int, max_output_bytes: int,
         stdin: str | None, disk_mb: int) -> ExecResult:
    """One run, inside bubblewrap when `bwrap` is (path, use a user namespace), else with the fallback layers."""
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="picochat_sandbox_"))
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        config = {
            "workdir": workdir,
            "memory_bytes": memory_mb * 1024 * 1024,
            # a backstop only: the parent enforces the wall clock itself, which a sleeping child does not burn
            "cpu_s": int(timeout_s) + 2,
            "disk_bytes": disk_mb * 1024 * 1024,
            "readable": list(_interpreter_files()),
            "in_bwrap": bwrap is not None,
        }
        return _spawn_and_collect(workdir, config, bwrap, timeout_s, max_output_bytes, stdin)
    finally:
        _remove_tree(workdir)


# ---------------------------------------------------------------------------------------------------------------------
# which isolation: bubblewrap if it works here, probed once per process


def _choose_bwrap() -> tuple[str, bool] | None:
    choice = os.environ.get("PICOCHAT_SANDBOX", "auto")
    if choice not in ("auto", "bwrap", "fallback"):
        raise UserError(f"PICOCHAT_SANDBOX={choice!r} is not one of auto, bwrap, fallback")
    if choice == "fallback":
        return None
    found = _probe_bwrap(shutil.which("bwrap") or "")
    if found is None and choice == "bwrap":
        raise UserError("PICOCHAT_SANDBOX=bwrap, but bubblewrap is not installed or cannot create namespaces here: "
                        "install it (apt-get install bubblewrap) or unset PICOCHAT_SANDBOX")
    return found


@functools.cache
def _probe_bwrap(path: str) -> tuple[str, bool] | None:
    """(path, userns) for the first way bubblewrap runs a trivial program here: with a user namespace, else (root
    in a container that forbids them) without. None if neither works (not installed, namespaces refused)."""
    if not path or not sys.platform.startswith("linux"):
        return None
    for userns in (True, False):
        if userns is False and os.geteuid() != 0:
            break  # without a user namespace bubblewrap needs root to create the others
        r = _run("print('ok')", (path, userns), 10.0, 256, 1024, None, 1)
        if (r.status, r.stdout) == ("ok", "ok\n"):
            return path, userns
    return None


@functools.cache
def _base_python() -> str:
    """The interpreter itself, not a venv's link to it: with -I -S the child needs nothing from the venv."""
    return os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable)


@functools.cache
def _interpreter_files() -> tuple[str, ...]:
    """What the child may read besides its work dir: the base interpreter, its stdlib (lib-dynload included), its
    shared libraries, the dynamic loader's cache and sandbox_child.py. Real paths, none inside another."""
    paths = [_base_python(), os.path.dirname(os.path.realpath(os.__file__)), _CHILD]
    dynload = sysconfig.get_config_var("DESTSHARED")
    if dynload and os.path.isdir(dynload):
        paths.append(dynload)
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        lib = os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("INSTSONAME") or "")
        if os.path.isfile(lib):
            paths.append(lib)
    # The extension modules link against system libraries (libssl, libsqlite3, libffi, ...) from libc's directory.
    libc_dir = _libc_dir()
    if libc_dir:
        paths.append(libc_dir)
    if os.path.isfile("/etc/ld.so.cache"):
        paths.append("/etc/ld.so.cache")
    real = [os.path.realpath(p) for p in paths]
    return tuple(p for i, p in enumerate(real) if p not in real[:i] and not any(
        p.startswith(q + os.sep) for q in real if os.path.isdir(q) and q != p))


def _libc_dir() -> str | None:
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            for line in f:
                fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
                path = fields[5].strip() if len(fields) == 6 else ""
                if os.path.basename(path).startswith(("libc.so", "libc-", "libc.musl")):
                    return os.path.dirname(os.path.realpath(path))
    except OSError:
        pass
    return None


def _elf_interpreter(exe: str) -> str | None:
    """The dynamic loader named in the executable's PT_INTERP (e.g. /lib64/ld-linux-x86-64.so.2), or None."""
    import struct

    try:
        with open(exe, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:  # 64-bit little-endian only
                return None
            phoff, = struct.unpack_from("<Q", head, 32)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                p_type, _, p_offset, _, _, p_filesz = struct.unpack("<IIQQQQ", f.read(40))
                if p_type == 3:  # PT_INTERP
                    f.seek(p_offset)
                    return f.read(p_filesz).rstrip(b"\0").decode()
    except (OSError, struct.error, UnicodeDecodeError):
        pass
    return None


def _bwrap_argv(path: str, userns: bool, workdir: str, disk_bytes: int, info_fd: int) -> list[str]:
    """bubblewrap's arguments: new namespaces, and a file tree holding only what the child may read."""
    argv = [path, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--info-fd", str(info_fd)]
    if userns:
        argv += ["--unshare-user", "--uid", str(_NOBODY), "--gid", str(_NOBODY)]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):  # merged-/usr systems: /lib -> usr/lib
        if os.path.islink(f"/{name}"):
            argv += ["--symlink", os.readlink(f"/{name}"), f"/{name}"]
    for p in _interpreter_files():
        argv += ["--ro-bind", p, p]
    interp = _elf_interpreter(_base_python())
    if interp:  # the loader at the path the executable names, its directory resolved through the links above
        argv += ["--ro-bind", os.path.realpath(interp),
                 os.path.join(os.path.realpath(os.path.dirname(interp)), os.path.basename(interp))]
    for dev in ("/dev/null", "/dev/zero", "/dev/urandom"):
        argv += ["--dev-bind", dev, dev]
    argv += ["--proc", "/proc", "--size", str(sandbox_child.TMP_BYTES), "--tmpfs", "/tmp",
             "--size", str(disk_bytes), "--tmpfs", workdir,
             "--ro-bind", os.path.join(workdir, "main.py"), os.path.join(workdir, "main.py"),
             "--remount-ro", "/", "--chdir", workdir]
    return argv


# ---------------------------------------------------------------------------------------------------------------------
# parent side


def _child_env(workdir: str) -> dict[str, str]:
    """Only what the interpreter needs: nothing inherited except LD_LIBRARY_PATH (some Python builds need it)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    if "LD_LIBRARY_PATH" in os.environ:
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    return env


def _spawn_and_collect(workdir: str, config: dict, bwrap: tuple[str, bool] | None, timeout_s: float,
                       max_output_bytes: int, stdin: str | None) -> ExecResult:
    layers_r, layers_w = os.pipe()  # the child writes the layers it set up here, then closes it
    info_r, info_w = os.pipe() if bwrap else (-1, -1)  # bubblewrap writes {"child-pid": <its init>} here
    config["layers_fd"] = layers_w
    argv = [_base_python(), "-I", "-S", "-B", "-u", "-X", "utf8", _CHILD, json.dumps(config)]
    if bwrap:
        argv = _bwrap_argv(bwrap[0], bwrap[1], workdir, config["disk_bytes"], info_w) + ["--"] + argv
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
            pass_fds=[fd for fd in (layers_w, info_w) if fd >= 0],
        )
    finally:
        if stdin_file is not None:
            stdin_file.close()
        for fd in (layers_w, info_w):
            if fd >= 0:
                os.close(fd)
    ns_init = None
    try:
        ns_init = _namespace_init(info_r, t0 + timeout_s) if bwrap else None
        out, err, reason = _collect(proc, t0 + timeout_s, max_output_bytes)
    finally:
        _stop(proc, ns_init)
        proc.stdout.close()
        proc.stderr.close()
        returncode = proc.wait()
        if ns_init is not None:
            _wait_readable(ns_init, _NAMESPACE_GONE_S)  # init exits only once every process in it is gone
            os.close(ns_init)
        layers = _read_layers(layers_r)
        for fd in (layers_r, info_r):
            if fd >= 0:
                os.close(fd)
    duration = time.monotonic() - t0
    if bwrap:
        layers = ("bwrap", *(("userns",) if bwrap[1] else ()), "pidns", "netns", "mountns", *layers) if layers else ()
        if returncode is not None and 128 < returncode < 128 + 65:
            returncode = 128 - returncode  # bubblewrap reports a child killed by signal n as exit 128 + n

    truncated = reason == "output_limit"
    if reason is not None:
        status = reason
    elif returncode == 0:
        status = "ok"
    elif (returncode == sandbox_child.MEMORY_EXIT and b"MemoryError" in err) or returncode == -signal.SIGKILL:
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
        layers=layers,
    )


def _namespace_init(info_r: int, deadline: float) -> int | None:
    """A pidfd of the PID namespace's init (bubblewrap's), read from its info fd at start, while the init surely
    runs (it waits for the child). None where pidfds are missing or bubblewrap failed before writing."""
    buf = b""
    sel = selectors.DefaultSelector()
    sel.register(info_r, selectors.EVENT_READ)
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            chunk = os.read(info_r, 4096)
            buf += chunk
            try:
                pid = json.loads(buf)["child-pid"]
                break
            except (ValueError, KeyError):
                if not chunk:
                    return None
        else:
            return None
    finally:
        sel.close()
    if not hasattr(os, "pidfd_open") or not isinstance(pid, int):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _stop(proc: subprocess.Popen, ns_init: int | None) -> None:
    """Kill everything of the run: the PID namespace through its init, and the child's process group."""
    if ns_init is not None:
        try:
            signal.pidfd_send_signal(ns_init, signal.SIGKILL)
        except ProcessLookupError:  # already gone
            pass
    _kill_group(proc.pid)  # no-op when already gone; pid cannot be reused before proc.wait() reaps it


def _wait_readable(fd: int, timeout_s: float) -> None:
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    try:
        sel.select(timeout=timeout_s)
    finally:
        sel.close()


def _read_layers(fd: int) -> tuple[str, ...]:
    """Which layers the child reported before running the user's code (it closed the pipe then)."""
    os.set_blocking(fd, False)
    try:
        layers = json.loads(os.read(fd, 65536) or b"[]")
    except (OSError, ValueError):
        return ()
    return tuple(x for x in layers if isinstance(x, str)) if isinstance(layers, list) else ()


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


def _remove_tree(path: str) -> None:
    """Delete the work dir even if the code made parts of it read-only, without ever following a symlink.

    Every step is relative to an open directory fd, and a directory is made writable through an O_PATH fd of that
    very directory: a chmod of a checked *path* could land on a symlink that a process still running in the
    sandbox swapped in between the check and the chmod (it did: tests/test_sandbox.py, the clean-up probe).
    """
    try:
        if hasattr(os, "O_PATH") and os.path.isdir("/proc/self/fd"):
            _clear_dir(path, None)
            os.rmdir(path)
        else:  # macOS: no O_PATH; shutil's fd-based walk still never follows a symlink
            shutil.rmtree(path)
    except (OSError, RecursionError) as e:
        print(f"picochat.sandbox: warning: could not remove temporary directory {path}: {e}", file=sys.stderr)


def _clear_dir(name: str, parent_fd: int | None) -> None:
    nofollow = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    handle = os.open(name, os.O_PATH | nofollow, dir_fd=parent_fd)  # fails on a symlink; needs no permission
    try:
        os.chmod(f"/proc/self/fd/{handle}", 0o700)  # through the fd's link: exactly this inode
        fd = os.open(".", os.O_RDONLY | nofollow, dir_fd=handle)
    finally:
        os.close(handle)
    try:
        for entry in os.scandir(fd):
            if entry.is_dir(follow_symlinks=False):
                _clear_dir(entry.name, fd)
                os.rmdir(entry.name, dir_fd=fd)
            else:
                os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)
