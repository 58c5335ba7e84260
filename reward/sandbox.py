"""Run untrusted, model-written Python against unit tests in a locked-down child process.

    run_python_tests(code, tests, limits=None) -> SandboxResult

The code runs in a fresh `python -I -S -B` process, in its own session, with a fresh temporary
folder as working directory (deleted afterwards). Protection comes in layers; each one that this
machine cannot provide is left out, and `SandboxResult.layers` / `sandbox_setup()` say which are on:

  netns    own network namespace (only a down loopback): unshare(CLONE_NEWNET) as root
  userns   when not root: unshare(CLONE_NEWUSER | CLONE_NEWNET), same effect on the network
  mountns  (root) own mount namespace: size-capped tmpfs on the work folder and on /tmp, /var/tmp,
           /dev/shm, so nothing the code writes reaches the host's disk
  nobody   (root) runs as uid/gid 65534: file permissions and RLIMIT_NPROC apply
  rlimits  CPU, address space, file size, open files, processes; no core files
  audit    a `sys.addaudithook` hook, installed before the user code runs, that blocks network use,
           writes outside the work folder, links, process spawning, ctypes, signals to other
           processes and tracing; it reports each block on a private channel (reward 0)

Always: a wall-clock timeout that SIGKILLs the whole process group, and capped output.
The audit hook is not a security boundary on its own (PEP 578); the kernel layers are. Likewise the
tests run in the same interpreter as the code: the result channel needs a per-run nonce and gc /
tracing are blocked, but code that walks frames (sys._getframe) could still tamper with the harness.
Namespaces, rlimits and the privilege drop run in a `preexec_fn` that only calls what was loaded
beforehand; Python warns that preexec_fn in a process with many threads can, rarely, deadlock.

Tests are Python snippets (`assert add(1, 2) == 3`) run one by one after the code; each passes if
it raises nothing. They may call `same(got, expected)`: equality that also checks types, so an
object whose `__eq__` always returns True does not pass.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

NOBODY = 65534
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 2, 4, 8, 1 << 14, 1 << 18
_SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
_CHANNEL_CAP = 64 * 1024
_SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class SandboxLimits:
    wall_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 512
    max_output_bytes: int = 64 * 1024
    max_file_bytes: int = 1024 * 1024
    max_open_files: int = 64
    max_procs: int = 32  # per user: with the `nobody` layer, shared by all sandboxes running at once
    disk_mb: int = 16  # size of the work folder's tmpfs (mountns layer)


@dataclass
class SandboxResult:
    passed: int
    total: int
    reward: float
    reason: str
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0
    layers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SandboxSetup:
    python: str
    layers: tuple[str, ...]  # kernel layers used for every run, in the order they are set up
    notes: tuple[str, ...]  # why a layer is missing


# --------------------------------------------------------------------------- child bootstrap
# Runs as `python -I -S -B -c _BOOTSTRAP <channel fd>`; reads {nonce, work, code, tests} as JSON on
# stdin, installs the audit hook, runs the code and the tests, and writes
# "RESULT <nonce> <passed> <total> <reason>" on the channel. Blocks are written as
# "BLOCKED <nonce> <reason>". Everything the hook and the harness call is bound before the user code
# runs, so monkeypatching builtins or modules does not change them.
_BOOTSTRAP = r'''
import json, os, sys, types


def _install_hook(chan, nonce, work):
    import stat as stat_module
    write, getcwd, getpid, fspath, stat = os.write, os.getcwd, os.getpid, os.fspath, os.stat
    isdir = stat_module.S_ISDIR
    exact_str, exact_bytes_decode, type_, int_, str_, bytes_ = str.__str__, bytes.decode, type, int, str, bytes
    isinstance_, permission_error, os_error = isinstance, PermissionError, OSError
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    network = frozenset(("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
                         "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo", "socket.sethostname"))
    spawn = frozenset(("os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.system", "subprocess.Popen"))
    # event -> (indices of path arguments, indices of dir_fd arguments)
    path_events = {"os.mkdir": ((0,), (2,)), "os.rmdir": ((0,), (1,)), "os.remove": ((0,), (1,)),
                   "os.rename": ((0, 1), (2, 3)), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
                   "os.utime": ((0,), (3,)), "os.truncate": ((0,), ()), "os.setxattr": ((0,), ()),
                   "os.removexattr": ((0,), ())}
    denied_imports = {"_posixsubprocess": "process spawn", "_ctypes": "ctypes"}
    introspection = frozenset(("gc.get_objects", "gc.get_referrers", "gc.get_referents"))
    state = {"outside_dir_fd": False}

    def text(path):
        """`path` as an exact str (subclasses copied, path-likes converted), or None for an fd."""
        if isinstance_(path, int_):
            return None
        if not isinstance_(path, (str_, bytes_)):
            path = fspath(path)
        if isinstance_(path, bytes_):
            return exact_bytes_decode(path, "utf-8", "surrogateescape")
        return exact_str(path)

    def absolute(path):
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts)

    def inside(path):
        return path == work or path.startswith(work + "/")

    def block(reason):
        try:
            write(chan, ("BLOCKED " + nonce + " " + reason + "\n").encode())
        except os_error:
            pass
        raise permission_error("sandbox: " + reason + " is not allowed")

    def check_open(args):
        path, mode, flags = args
        raw = text(path)
        if raw is None:
            return
        full = absolute(raw)
        if full.startswith("/proc/") and full.endswith("/mem"):
            block("introspection")
        if type_(flags) is int_ and flags & write_flags:
            if full == "/dev/null":
                return
            if not inside(full) or (mode is None and not raw.startswith("/") and state["outside_dir_fd"]):
                block("write outside temp folder")
        elif mode is None and not inside(full):  # os.open of a folder outside: could serve as a dir_fd
            try:
                if isdir(stat(full).st_mode):
                    state["outside_dir_fd"] = True
            except os_error:
                pass

    def hook(event, args):
        if event == "open":
            check_open(args)
        elif event in path_events:
            paths, dir_fds = path_events[event]
            for i in dir_fds:
                if args[i] not in (None, -1) and state["outside_dir_fd"]:
                    block("write outside temp folder")
            for i in paths:
                raw = text(args[i])
                if raw is not None and not inside(absolute(raw)):
                    block("write outside temp folder")
        elif event in network:
            block("network")
        elif event in spawn:
            block("process spawn")
        elif event.startswith("ctypes."):
            block("ctypes")
        elif event == "import":
            reason = denied_imports.get(exact_str(args[0]))
            if reason:
                block(reason)
        elif event in ("os.symlink", "os.link"):
            block("link")
        elif event in ("os.kill", "os.killpg", "signal.pthread_kill"):
            if event == "os.killpg" or (event == "os.kill" and args[0] not in (0, getpid())):
                block("signal")
        elif event in ("sys.settrace", "sys.setprofile"):
            block("tracing")
        elif event in introspection:
            block("introspection")

    sys.addaudithook(hook)


def _stub_posixsubprocess():
    """`import subprocess` (and asyncio) keeps working; spawning is refused by the hook."""
    audit = sys.audit
    stub = types.ModuleType("_posixsubprocess")

    def fork_exec(*args, **kwargs):
        audit("os.exec", None, None, None)
        raise PermissionError("sandbox: process spawn is not allowed")

    stub.fork_exec = fork_exec
    sys.modules["_posixsubprocess"] = stub  # a real re-import raises the "import" event: blocked


def _make_same():
    type_, len_, zip_, all_, dict_, list_, tuple_ = type, len, zip, all, dict, list, tuple
    numbers = (int, float)
    plain = (int, float, complex, str, bytes, bool, type(None), set, frozenset)

    def same(got, expected):
        """`got == expected` with matching types (int and float may mix), recursing into containers."""
        tg, te = type_(got), type_(expected)
        if tg is not te:
            return tg in numbers and te in numbers and got == expected
        if tg is list_ or tg is tuple_:
            return len_(got) == len_(expected) and all_(same(a, b) for a, b in zip_(got, expected))
        if tg is dict_:
            return got.keys() == expected.keys() and all_(same(got[k], expected[k]) for k in expected)
        return tg in plain and got == expected

    return same


def _run(chan, nonce, code, tests, same):
    write, exit_, compile_, exec_, dict_, str_, type_, len_ = os.write, os._exit, compile, exec, dict, str, type, len
    base_exception, memory_error, syntax_error = BaseException, MemoryError, SyntaxError
    out, err = sys.stdout, sys.stderr

    def describe(e):
        try:
            return (type_(e).__name__ + ": " + str_(e))[:300].replace("\n", " ")
        except base_exception:
            return "exception"

    def finish(passed, reason):
        for stream in (out, err):
            try:
                stream.flush()
            except base_exception:
                pass
        try:
            write(chan, ("RESULT %s %d %d %s\n" % (nonce, passed, len_(tests), reason)).encode())
        finally:
            exit_(0)

    module = types.ModuleType("solution")
    sys.modules["solution"] = module
    scope = module.__dict__
    try:
        compiled = compile_(code, "<solution>", "exec")
    except (syntax_error, ValueError):
        finish(0, "syntax error")
    try:
        exec_(compiled, scope)
    except memory_error:
        finish(0, "memory")
    except base_exception as e:
        finish(0, "runtime error: " + describe(e))
    passed, memory = 0, False
    for test in tests:
        namespace = dict_(scope)
        namespace["same"] = same
        try:
            exec_(compile_(test, "<test>", "exec"), namespace)
            passed += 1
        except memory_error:
            memory = True
        except base_exception as e:
            try:
                err.write("FAILED " + test[:200] + "  -> " + describe(e) + "\n")
            except base_exception:
                pass
    finish(passed, "memory" if memory else "ok")


def _main():
    chan = int(sys.argv[1])
    payload = json.loads(sys.stdin.buffer.read())
    sys.argv = ["solution"]
    same = _make_same()
    _stub_posixsubprocess()
    _install_hook(chan, payload["nonce"], payload["work"])
    _run(chan, payload.pop("nonce"), payload["code"], tuple(payload["tests"]), same)


_main()
'''


# --------------------------------------------------------------------------- host side
def run_python_tests(code: str, tests: list[str], limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code`, then each test, in the sandbox; reward = passed / total, 0 unless the run was clean."""
    if not isinstance(code, str):
        raise TypeError(f"run_python_tests: code must be str, got {type(code).__name__}")
    tests = list(tests)
    if not all(isinstance(t, str) for t in tests):
        raise TypeError("run_python_tests: tests must be a list of str")
    limits = limits or SandboxLimits()
    setup = sandbox_setup()
    layers = list(setup.layers) + ["rlimits", "audit"]
    nonce = secrets.token_hex(16)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sandbox-", ignore_cleanup_errors=True) as tmp:
        work = _make_work_folder(tmp, setup.layers)
        payload = json.dumps({"nonce": nonce, "work": work, "code": code, "tests": tests}).encode()
        try:
            proc, chan = _spawn(setup, limits, work, ["-c", _BOOTSTRAP])
        except (OSError, subprocess.SubprocessError) as e:
            return SandboxResult(0, len(tests), 0.0, f"sandbox error: {e}", layers=layers)
        try:
            out, err, chan_bytes, timed_out, overflow = _collect(proc, chan, payload, limits, start + limits.wall_s)
        finally:
            _kill_group(proc, chan)
    wall_s = time.monotonic() - start
    passed, reason = _judge(chan_bytes, nonce, len(tests), proc.returncode, err, timed_out, overflow)
    reward = passed / len(tests) if reason == "ok" and tests else 0.0
    cap = limits.max_output_bytes
    return SandboxResult(passed, len(tests), reward, reason, out[:cap].decode(errors="replace"),
                         err[:cap].decode(errors="replace"), wall_s, layers)


@functools.cache
def sandbox_setup() -> SandboxSetup:
    """Find, once per process, which kernel layers work here and which interpreter to run."""
    global _LIBC
    try:
        _LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: preexec_fn only calls it
        _LIBC.unshare, _LIBC.mount  # noqa: B018 - fail here if missing
    except (OSError, AttributeError) as e:
        _LIBC = None
        return SandboxSetup(_default_python(), (), (f"namespaces: libc unavailable ({e})",))
    python, layers, notes = _default_python(), [], []
    wanted = ["netns", "mountns", "nobody"] if os.geteuid() == 0 else ["userns"]
    for layer in wanted:
        if layer != "nobody":
            if _probe(python, tuple(layers) + (layer,)):
                layers.append(layer)
            else:
                notes.append(f"{layer}: unshare/mount refused on this machine")
            continue
        runnable = [exe for exe in _python_candidates(python) if _probe(exe, tuple(layers) + (layer,))]
        if runnable:
            python = runnable[0]
            layers.append(layer)
        else:
            notes.append(f"nobody: no python >= 3.8 that uid {NOBODY} may run")
    return SandboxSetup(python, tuple(layers), tuple(notes))


_LIBC: ctypes.CDLL | None = None


def _default_python() -> str:
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _python_candidates(first: str) -> list[str]:
    """`first`, then system interpreters (a venv or pyenv under /root is not readable by nobody)."""
    found = [first]
    major_minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for name in (major_minor, "python3"):
        exe = shutil.which(name, path=_SYSTEM_PATH)
        if exe and os.path.realpath(exe) not in found:
            found.append(os.path.realpath(exe))
    return found


def _probe(python: str, layers: tuple[str, ...]) -> bool:
    check = "import sys; sys.exit(0 if sys.version_info >= (3, 8) and hasattr(sys, 'addaudithook') else 3)"
    with tempfile.TemporaryDirectory(prefix="sandbox-probe-", ignore_cleanup_errors=True) as tmp:
        work = _make_work_folder(tmp, layers)
        try:
            proc = subprocess.Popen(
                [python, "-I", "-S", "-B", "-c", check], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True, env=_child_env(work),
                preexec_fn=functools.partial(_enter_sandbox, layers, SandboxLimits(), work))  # noqa: PLW1509
        except (OSError, subprocess.SubprocessError):
            return False
        try:
            return proc.wait(timeout=30) == 0
        except subprocess.TimeoutExpired:
            return False
        finally:
            _kill_group(proc)


def _make_work_folder(tmp: str, layers: tuple[str, ...]) -> str:
    work = os.path.join(os.path.realpath(tmp), "work")
    os.mkdir(work, 0o700)
    if "nobody" in layers:
        os.chmod(tmp, 0o711)  # nobody may pass through, not list
        os.chown(work, NOBODY, NOBODY)
    return work


def _child_env(work: str) -> dict[str, str]:
    return {"PATH": _SYSTEM_PATH, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _spawn(setup: SandboxSetup, limits: SandboxLimits, work: str, args: list[str]):
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen(
            [setup.python, "-I", "-S", "-B", *args, str(write_end)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(write_end,), start_new_session=True,
            env=_child_env(work),
            preexec_fn=functools.partial(_enter_sandbox, setup.layers, limits, work))  # noqa: PLW1509 - see module doc
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return proc, read_end


def _libc_call(ret: int, what: str) -> None:
    if ret != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _enter_sandbox(layers: tuple[str, ...], limits: SandboxLimits, work: str) -> None:
    """preexec_fn: runs in the forked child before exec. Namespaces, rlimits, then privilege drop."""
    libc = _LIBC
    if "userns" in layers:
        uid, gid = os.getuid(), os.getgid()
        _libc_call(libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET), "unshare(CLONE_NEWUSER|CLONE_NEWNET)")
        for name, line in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(line)
    if "netns" in layers:
        _libc_call(libc.unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")
    if "mountns" in layers:
        owner = NOBODY if "nobody" in layers else os.getuid()
        flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
        _libc_call(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _libc_call(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "make mounts private")
        for folder in _SCRATCH_DIRS:
            if os.path.isdir(folder) and not os.path.islink(folder):
                _libc_call(libc.mount(b"tmpfs", folder.encode(), b"tmpfs", flags, b"size=1m,mode=1777"), folder)
        os.umask(0o022)  # folders re-created on the new /tmp must stay passable for nobody
        os.makedirs(work, exist_ok=True)
        options = f"size={limits.disk_mb}m,mode=0700,uid={owner},gid={owner}".encode()
        _libc_call(libc.mount(b"tmpfs", work.encode(), b"tmpfs", flags, options), "tmpfs on work folder")
    os.chdir(work)
    cpu = max(1, int(limits.cpu_s))
    for limit, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_CORE, (0, 0)),
                         (resource.RLIMIT_AS, (limits.memory_mb << 20,) * 2),
                         (resource.RLIMIT_FSIZE, (limits.max_file_bytes,) * 2),
                         (resource.RLIMIT_NOFILE, (limits.max_open_files,) * 2),
                         (resource.RLIMIT_NPROC, (limits.max_procs,) * 2)):
        resource.setrlimit(limit, value)
    if "nobody" in layers:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


def _collect(proc: subprocess.Popen, chan: int, payload: bytes, limits: SandboxLimits, deadline: float):
    """Feed stdin, read stdout/stderr/channel with caps until EOF, exit, timeout or overflow."""
    caps = {proc.stdout.fileno(): limits.max_output_bytes, proc.stderr.fileno(): limits.max_output_bytes,
            chan: _CHANNEL_CAP}
    bufs = {fd: bytearray() for fd in caps}
    stdin = proc.stdin.fileno()
    os.set_blocking(stdin, False)
    sent, timed_out, overflow = 0, False, False
    with selectors.DefaultSelector() as sel:
        for fd in caps:
            sel.register(fd, selectors.EVENT_READ)
        sel.register(stdin, selectors.EVENT_WRITE)
        while sel.get_map() and not overflow:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(left):
                if key.fd == stdin:
                    try:
                        sent += os.write(stdin, payload[sent:sent + 65536])
                    except BlockingIOError:
                        continue
                    except OSError:  # child gone or stdin closed: nothing more to send
                        sent = len(payload)
                    if sent >= len(payload):
                        sel.unregister(stdin)
                        _close(proc.stdin)
                    continue
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                buf += data[:max(0, caps[key.fd] - len(buf))]
                if len(buf) >= caps[key.fd]:
                    overflow = True
    if not (timed_out or overflow):
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    stdout, stderr = bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()])
    return stdout, stderr, bytes(bufs[chan]), timed_out, overflow


def _close(stream) -> None:
    try:
        stream.close()
    except OSError:
        pass


def _kill_group(proc: subprocess.Popen, chan: int | None = None) -> None:
    """SIGKILL the child's whole process group (it leads it: start_new_session), then reap it."""
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            _close(stream)
    if chan is not None:
        os.close(chan)


def _judge(chan: bytes, nonce: str, total: int, returncode: int | None, stderr: bytes, timed_out: bool,
           overflow: bool) -> tuple[int, str]:
    """(passed, reason) from the channel lines and how the child ended."""
    blocked, result, tampered = [], None, False
    for line in chan.decode(errors="replace").splitlines():
        kind, _, rest = line.partition(" ")
        token, _, body = rest.partition(" ")
        if token != nonce or kind not in ("BLOCKED", "RESULT") or (kind == "RESULT" and result is not None):
            tampered = True
        elif kind == "BLOCKED":
            blocked.append(body)
        else:
            passed_s, _, rest = body.partition(" ")
            total_s, _, reason = rest.partition(" ")
            if not (passed_s.isdigit() and total_s == str(total) and int(passed_s) <= total):
                tampered = True
            else:
                result = (int(passed_s), reason)
    passed = result[0] if result else 0
    if blocked:
        return passed, f"blocked: {blocked[0]}"
    if tampered:
        return 0, "blocked: tampering with the result channel"
    if overflow:
        return 0, "output limit"
    if timed_out:
        return 0, "timeout"
    if result:
        return result
    if returncode == -signal.SIGXCPU:
        return 0, "timeout"
    if b"MemoryError" in stderr:
        return 0, "memory"
    if returncode is not None and returncode < 0:
        return 0, f"killed by {signal.Signals(-returncode).name}"
    return 0, f"runtime error: exited with code {returncode} before reporting"
