"""The sandboxed child's entry point: limits itself, then runs the user's main.py. Stdlib only.

picochat.sandbox.run_python starts `python -I -S -B -u -X utf8 picochat/sandbox_child.py CONFIG` (inside bubblewrap
where it works); do not run it by hand. It is the only picochat file the child can read, and it imports nothing from
picochat. Order matters: rlimits, then (without bubblewrap) its own user/net/mount namespaces, then Landlock (which
forbids later mounts), then seccomp (which forbids the unshare/mount calls before it; where it is missing,
RLIMIT_NPROC = 0 instead), then the Python-level guards.
The layers that took effect are written to CONFIG["layers_fd"] as a JSON list before the user's code runs.
"""

from __future__ import annotations

import ast
import json
import os
import sys

# The child exits with this code when the user's code died of MemoryError (RLIMIT_AS), so the parent can report
# "memory" even when stderr was truncated. 3 is not used by the interpreter itself (it uses 1, 2 and 120).
MEMORY_EXIT = 3
_MAX_FILE_BYTES = 16 * 1024 * 1024
_MAX_OPEN_FILES = 256
TMP_BYTES = 1024 * 1024  # the private /tmp: TMPDIR points at the work dir, so /tmp is for code that hard-codes it


def main(argv: list[str]) -> None:
    import builtins
    import traceback
    import types

    config = json.loads(argv[0])
    os.environ.pop("PWD", None)  # bubblewrap's --chdir sets it; keep the environment exactly as the parent passed it
    workdir = config["workdir"]
    main_path = os.path.join(workdir, "main.py")
    with open(main_path, encoding="utf-8") as f:
        source = f.read()  # read before a tmpfs may cover the directory
    layers = ["rlimits"] if _rlimits(config) else []
    if sys.platform.startswith("linux"):
        if not config["in_bwrap"]:
            layers += _namespaces(workdir, source, config["disk_bytes"])
        if _landlock(workdir, config["readable"]):
            layers.append("landlock")
        if _seccomp():
            layers.append("seccomp")
    if "seccomp" not in layers:
        _limit("RLIMIT_NPROC", 0, 0)  # no new processes, and no threads either: the best there is without the filter
    os.write(config["layers_fd"], json.dumps(layers).encode())
    os.close(config["layers_fd"])
    _guards(workdir)

    module = types.ModuleType("__main__")
    module.__file__ = main_path
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    sys.argv = ["main.py"]
    try:
        _run_cell(source, module.__dict__)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - report every failure of the user's code as Python would, then exit
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next  # hide the sandbox's own frames: the traceback should start in main.py
        traceback.print_exception(type(e), e, tb)
        sys.exit(MEMORY_EXIT if isinstance(e, MemoryError) else 1)


def _run_cell(source: str, namespace: dict) -> None:
    """main.py as a notebook cell: its statements, then a final top-level expression's value printed (its repr, as
    Python's prompt shows it) unless it is None. The model's calls are mostly one expression,
    'strawberry'.count('r'), whose value a plain run would drop: the tool answered "" where the training replies
    (computed by the calculator) show the count."""
    tree = compile(source, "main.py", "exec", ast.PyCF_ONLY_AST)  # the builtin: no ast.py frame in a traceback
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "main.py", "exec"), namespace)
    if last is not None:
        value = eval(compile(ast.Expression(last.value), "main.py", "eval"), namespace)
        if value is not None:
            print(repr(value))


def _rlimits(config: dict) -> bool:
    # (soft, hard). soft == hard so the user's code cannot raise a limit back, except CPU: at the soft limit the
    # kernel sends SIGXCPU (reported as "timeout"), at the hard one SIGKILL (which would read as the OOM killer).
    # RLIMIT_NPROC is set later, only where the seccomp filter is missing (it is not enforced for uid 0 anyway).
    _limit("RLIMIT_AS", config["memory_bytes"], config["memory_bytes"])
    _limit("RLIMIT_CPU", config["cpu_s"], config["cpu_s"] + 1)
    _limit("RLIMIT_FSIZE", _MAX_FILE_BYTES, _MAX_FILE_BYTES)
    _limit("RLIMIT_NOFILE", _MAX_OPEN_FILES, _MAX_OPEN_FILES)
    _limit("RLIMIT_CORE", 0, 0)
    return True


def _limit(name: str, soft: int, hard: int) -> None:
    import resource

    which = getattr(resource, name, None)
    if which is None:
        return
    _, host_hard = resource.getrlimit(which)
    if host_hard != resource.RLIM_INFINITY:  # never try to raise a limit the host already set lower
        soft, hard = min(soft, host_hard), min(hard, host_hard)
    resource.setrlimit(which, (soft, hard))


def _namespaces(workdir: str, source: str, disk_bytes: int) -> list[str]:
    """Without bubblewrap: new user + network + mount namespaces where the kernel allows, a private /tmp and a
    size-limited tmpfs over the work dir (the disk quota). Returns the layers that took effect."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    newns, newuser, newnet = 0x00020000, 0x10000000, 0x40000000
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(newuser | newnet | newns) == 0:
        # Map our own ids (the one mapping an unprivileged process may write): files created on the tmpfs below
        # need an owner that exists in the namespace (EOVERFLOW otherwise).
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                           ("/proc/self/gid_map", f"{gid} {gid} 1")):
            with open(path, "w") as f:
                f.write(text)
        layers = ["userns", "netns"]
    elif libc.unshare(newnet | newns) == 0:  # root inside a container that forbids user namespaces
        layers = ["netns"]
    else:
        return ["netns"] if libc.unshare(newnet) == 0 else []
    ms_nosuid, ms_nodev, ms_rec, ms_private = 0x2, 0x4, 0x4000, 0x40000
    # private propagation first, so the mounts below never show up in the host's mount table
    if libc.mount(None, b"/", None, ms_rec | ms_private, None) != 0:
        return layers
    for path, size in (("/tmp", TMP_BYTES), (workdir, disk_bytes)):  # /tmp first: it may hold the work dir
        os.makedirs(path, exist_ok=True)
        opts = f"size={size},mode=0700".encode()
        if libc.mount(b"tmpfs", path.encode(), b"tmpfs", ms_nosuid | ms_nodev, opts) != 0:
            return layers
    os.chdir(workdir)  # the old cwd is the directory now under the tmpfs
    with open("main.py", "w", encoding="utf-8") as f:
        f.write(source)  # tracebacks show source lines from it
    return layers + ["mountns"]


# Landlock constants from <linux/landlock.h>; the syscall numbers are the same on every architecture.
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
# REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM
_LL_MODIFY = sum(1 << i for i in range(4, 13))
_LL_REFER, _LL_TRUNCATE, _LL_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
_LL_NET_BIND_TCP, _LL_NET_CONNECT_TCP = 1, 2  # ABI 4
_LL_SCOPE_ABSTRACT_UNIX, _LL_SCOPE_SIGNAL = 1, 2  # ABI 6
_DEVICES = {"/dev/null": _LL_READ_FILE | _LL_WRITE_FILE, "/dev/zero": _LL_READ_FILE, "/dev/urandom": _LL_READ_FILE}


def _landlock(workdir: str, readable: list[str]) -> bool:
    """Reads only from `readable` (the interpreter, its stdlib and shared libraries), the work dir and a few
    devices; writes only in the work dir (and /dev/null); no execve, no TCP, no signals out of the sandbox.
    Returns False where Landlock is missing (old kernel, disabled LSM, seccomp filter)."""
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

    truncate = _LL_TRUNCATE if abi >= 3 else 0
    fs = (_LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | _LL_READ_DIR | _LL_MODIFY | truncate
          | (_LL_REFER if abi >= 2 else 0) | (_LL_IOCTL_DEV if abi >= 5 else 0))
    attr = RulesetAttr(fs, 0, 0)
    size = 8  # the kernel rejects a struct larger than its ABI knows, so pass only the fields this ABI has
    if abi >= 4:
        attr.net, size = _LL_NET_BIND_TCP | _LL_NET_CONNECT_TCP, 16  # no net rule added: all TCP is denied
    if abi >= 6:
        attr.scoped, size = _LL_SCOPE_ABSTRACT_UNIX | _LL_SCOPE_SIGNAL, 24
    ruleset = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return False
    rules = [(workdir, fs & ~_LL_EXECUTE & ~(_LL_IOCTL_DEV if abi >= 5 else 0))]
    rules += [(p, _LL_READ_FILE | _LL_READ_DIR) for p in readable if os.path.isdir(p)]
    rules += [(p, _LL_READ_FILE) for p in readable if os.path.isfile(p)]
    rules += [(p, bits | (truncate if bits & _LL_WRITE_FILE else 0)) for p, bits in _DEVICES.items()
              if os.path.exists(p)]
    try:
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


# Syscalls refused with EPERM, per architecture (numbers from <asm/unistd_64.h> and <asm-generic/unistd.h>).
# Processes (RLIMIT_NPROC does not bind uid 0), execve, socket() (AF_UNIX by path reaches host services that a network
# namespace does not cover; socketpair stays allowed: asyncio needs it), and the calls that could undo the namespaces
# or reach other processes: ptrace, process_vm_*, mount/unshare/setns, io_uring (it can open sockets past this filter),
# bpf, perf_event_open, userfaultfd, keyrings, pidfds.
_SECCOMP_ARCH = {
    "x86_64": {"audit": 0xC000003E, "clone": 56, "self_only": (62, 200, 234, 129, 297), "denied": (
        57, 58, 59, 322, 41, 101, 310, 311, 165, 166, 155, 161, 272, 308, 321, 298, 323, 250, 248, 249)},
    # fork, vfork, execve, execveat, socket, ptrace, process_vm_readv/writev, mount, umount2, pivot_root, chroot,
    # unshare, setns, bpf, perf_event_open, userfaultfd, keyctl, add_key, request_key; self_only: kill, tkill,
    # tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo
    "aarch64": {"audit": 0xC00000B7, "clone": 220, "self_only": (129, 130, 131, 138, 240), "denied": (
        221, 281, 198, 117, 270, 271, 40, 39, 41, 51, 97, 268, 280, 241, 282, 219, 217, 218)},
}
# The same numbers on every architecture: open_tree .. fspick, io_uring_*, mount_setattr, pidfd_send_signal,
# pidfd_open, pidfd_getfd
_SECCOMP_COMMON = (428, 429, 430, 431, 432, 433, 425, 426, 427, 442, 424, 434, 438)
_CLONE3 = 435


def _seccomp() -> bool:
    """Install the filter above. Signals may go only to this process (kill(-1) from a uid shared with the host
    would reach every process of that uid). clone() is allowed only with CLONE_THREAD (threads share the memory
    limit); clone3 answers ENOSYS, because its flags sit behind a pointer a filter cannot read, and glibc then falls
    back to clone()."""
    import ctypes
    import struct

    arch = _SECCOMP_ARCH.get(os.uname().machine)
    if arch is None:
        return False
    ld_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, eperm, enosys, clone_thread = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38, 0x00010000

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)  # struct sock_filter

    # seccomp_data: nr at offset 0, arch at 4, args[0] at 16 (low 32 bits first on little-endian)
    prog = [op(ld_abs, 4), op(jeq, arch["audit"], 1, 0), op(ret, eperm), op(ld_abs, 0)]
    if arch["audit"] == 0xC000003E:
        prog += [op(jge, 0x40000000, 0, 1), op(ret, eperm)]  # the x32 ABI: same calls under other numbers
    for nr in (*arch["denied"], *_SECCOMP_COMMON):
        prog += [op(jeq, nr, 0, 1), op(ret, eperm)]
    for nr in arch["self_only"]:  # allowed when the first argument is our pid (or 0, our own process group)
        prog += [op(jeq, nr, 0, 5), op(ld_abs, 16), op(jeq, os.getpid(), 2, 0), op(jeq, 0, 1, 0), op(ret, eperm),
                 op(ret, allow)]
    prog += [op(jeq, _CLONE3, 0, 1), op(ret, enosys)]
    prog += [op(jeq, arch["clone"], 0, 3), op(ld_abs, 16), op(jset, clone_thread, 1, 0), op(ret, eperm),
             op(ret, allow)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
        return False
    fprog = SockFprog(len(prog), b"".join(prog))
    return libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(fprog), 0, 0) == 0


def _guards(workdir: str) -> None:
    """Python-level guards: they make ordinary mistakes fail with a clear message, and are all a host without
    namespaces, seccomp or Landlock gets. Code that means to escape can undo them (e.g. by re-importing posix)."""
    import builtins
    import io
    import posix
    import socket
    import subprocess

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
    main(sys.argv[1:])
