"""Run untrusted Python in a throw-away sandbox.

``run_python(code, ...)`` executes one program and returns an :class:`ExecResult`.  The program gets
its own process tree, resource limits, an empty scrubbed environment and a private scratch folder
that is deleted afterwards.  Isolation comes from what Linux already ships, strongest first:

``bwrap`` (bubblewrap, Debian package ``bubblewrap``)
    Fresh user, PID, network, IPC and UTS namespaces.  The root file system is an empty tmpfs with
    read-only binds of ``/usr``, the ``/lib*`` links and the interpreter's prefix only (no ``/home``,
    ``/root``, project checkout or ``/etc`` secrets), then remounted read-only.  The only writable
    places are size-limited tmpfs mounts (``/tmp``, which holds the working folder, and
    ``/dev/shm``).  bwrap's own init is PID 1, so when the program exits or we kill the sandbox
    every descendant dies with the namespace, including ones that called ``setsid()``.  A fresh
    ``/proc`` shows only the sandbox, so the parent's ``/proc/<pid>/environ`` cannot be read.
    When we are root, bwrap itself is started under a fresh random uid (``setpriv``): the kernel
    never enforces ``RLIMIT_NPROC`` for root (not even inside a user namespace), and such a uid
    owns no host file.
``unshare`` (util-linux, used when bwrap is missing or cannot create namespaces)
    Fresh network and PID namespaces with a new ``/proc``.  As root the program additionally runs
    under a random unprivileged uid, so ordinary file permissions stop writes to ``/etc``, home and
    root-owned checkouts; it can still read world-readable files and write to world-writable
    folders.  As an ordinary user it runs as that user (file writes NOT contained).
``none``
    A new session with resource limits only: no network isolation, escaped ``setsid()`` children can
    survive, and the parent's environment is readable through ``/proc`` when uids match.

Every result carries the :class:`Isolation` that was really applied, and a warning is logged once
when the best backend is weaker than bwrap.  ``REWARDS_SANDBOX_BACKEND=bwrap|unshare|none`` forces a
backend (a forced backend that does not work is an error, never a silent downgrade).

Resource limits are set with ``prlimit`` (util-linux) right before the interpreter starts, hard
limit equal to soft limit so the program cannot raise them: address space (``memory_mb``), CPU
seconds, file size (``file_mb``), process count (``max_procs``, counted per sandbox), open files,
and no core dumps.  Sandboxed code gets the standard library only (``python -I -S``); if this
process's interpreter is unreadable for an unprivileged uid (pyenv under ``/root``), the system
interpreter of the same version is used (``Isolation.python`` says which).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
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

log = logging.getLogger(__name__)

__all__ = ["ExecResult", "Isolation", "run_python", "detect_isolation", "STATUSES"]

STATUSES = ("ok", "error", "timeout", "memory", "killed")
BACKENDS = ("bwrap", "unshare", "none")

_SANDBOX_UID = 65534  # "nobody" inside the bwrap user namespace
_SRC_IN_SANDBOX = "/sandbox"  # read-only copy of the program and its files
_WORK_IN_SANDBOX = "/tmp/work"  # writable scratch folder, cwd and HOME
_GRACE_S = 0.25  # how long output may still drain after the program itself exited


@dataclasses.dataclass(frozen=True)
class Isolation:
    """What the sandbox really enforced for one run."""

    backend: str  # "bwrap" | "unshare" | "none"
    network: bool  # fresh network namespace: nothing outside the sandbox is reachable
    pid_namespace: bool  # whole tree dies with the sandbox; host processes (and their environ) hidden
    readonly_fs: bool  # only private scratch tmpfs mounts are writable
    separate_uid: bool  # runs under a uid that owns no host files
    process_limit: bool  # RLIMIT_NPROC is enforced (the kernel exempts host root)
    python: str = ""  # interpreter used inside the sandbox
    note: str = ""


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """Outcome of one sandboxed execution.

    ``status``: ``ok`` (exit 0), ``error`` (non-zero exit), ``timeout`` (wall or CPU limit),
    ``memory`` (address-space limit hit), ``killed`` (signal, output limit, or sandbox failure).
    ``stdout``/``stderr`` are decoded UTF-8 (invalid bytes replaced), each capped at
    ``max_output_bytes``; ``truncated`` says a cap was hit.
    """

    status: str
    exit_code: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: Isolation
    truncated: bool = False
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# --------------------------------------------------------------------------- backend detection


def _world_accessible(path: str) -> bool:
    """True if a uid that owns nothing can execute ``path`` (every parent dir o+x, file o+rx)."""
    path = os.path.realpath(path)
    try:
        st = os.stat(path)
        if st.st_mode & (stat.S_IROTH | stat.S_IXOTH) != (stat.S_IROTH | stat.S_IXOTH):
            return False
        parent = os.path.dirname(path)
        while True:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            if parent == "/":
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


@functools.cache
def _interpreter(unprivileged: bool) -> str:
    """The real interpreter binary to run sandboxed code with (outside any venv).

    Sandboxed programs get the standard library only (``-I -S``): no site-packages, which keeps
    start-up near 15 ms and the attack surface small.  When the sandbox runs under a uid that owns
    nothing (``unprivileged``) and this process's interpreter is out of its reach (e.g. pyenv
    under ``/root``), the system interpreter of the same version is used instead.
    """
    exe = os.path.realpath(sys.executable)
    if not unprivileged or _world_accessible(exe):
        return exe
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if os.path.exists(candidate) and _world_accessible(candidate):
            return os.path.realpath(candidate)
    return ""


def _prefixes(exe: str) -> list[str]:
    """Folders the interpreter needs besides /usr (its installation prefix)."""
    if exe == os.path.realpath(sys.executable):
        found = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
    else:
        found = {os.path.dirname(os.path.dirname(exe))}
    return sorted(p for p in found if p != "/usr" and not p.startswith("/usr/"))


def _bwrap_prefix(src: str, limits: _Limits, python: str, drop_uid: bool) -> list[str]:
    bwrap = shutil.which("bwrap") or "bwrap"
    # As root, bwrap itself runs under a fresh unprivileged uid: the kernel never applies
    # RLIMIT_NPROC to host root, even inside a user namespace.
    argv = _uid_drop_argv(_random_uid()) if drop_uid else _guard_argv()
    argv += [
        bwrap,
        "--unshare-all",  # net, pid, ipc, uts, cgroup (+ user-try)
        "--unshare-user",
        "--uid", str(_SANDBOX_UID), "--gid", str(_SANDBOX_UID),
        "--die-with-parent",
        "--new-session",  # no TIOCSTI into a terminal
        "--cap-drop", "ALL",
        "--hostname", "sandbox",
        "--ro-bind", "/usr", "/usr",
    ]
    if _bwrap_supports_disable_userns():
        argv.append("--disable-userns")
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    for path in _prefixes(python):
        argv += ["--ro-bind", path, path]
    for path in ("/etc/ld.so.cache", "/etc/localtime", "/etc/alternatives"):
        argv += ["--ro-bind-try", path, path]
    argv += [
        "--proc", "/proc",
        "--dev", "/dev",
        "--remount-ro", "/dev",
        "--size", str(limits.shm_bytes), "--tmpfs", "/dev/shm",
        "--size", str(limits.disk_bytes), "--tmpfs", "/tmp",
        "--dir", _WORK_IN_SANDBOX,
        "--ro-bind", src, _SRC_IN_SANDBOX,
        "--remount-ro", "/",
        "--chdir", _WORK_IN_SANDBOX,
        "--",
    ]
    return argv


@functools.cache
def _bwrap_supports_disable_userns() -> bool:
    try:
        out = subprocess.run(["bwrap", "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return "--disable-userns" in out.stdout + out.stderr


def _uid_drop_argv(uid: int) -> list[str]:
    # --pdeathsig: if this process dies (even by SIGKILL), the sandbox goes with it.  It is set
    # after the uid change, which would otherwise clear it.
    setpriv = shutil.which("setpriv") or "setpriv"
    return [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
            "--pdeathsig", "KILL", "--"]


def _guard_argv() -> list[str]:
    """Tie the sandbox's outermost process to this one (see ``_uid_drop_argv``)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def _unshare_prefix() -> list[str]:
    unshare = shutil.which("unshare") or "unshare"
    argv = [unshare]
    if os.geteuid() != 0:
        argv += ["--user", "--map-root-user"]
    # --kill-child: the program is PID 1 of the namespace; when it (or unshare) dies, all die.
    return argv + ["--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc", "--"]


def _probe(argv: list[str]) -> str:
    """Run a trivial command through ``argv``; '' on success, else why not."""
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                             env=_base_env("/"), cwd="/")
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if out.returncode != 0 or out.stdout.strip() != b"ok":
        return (out.stderr.decode(errors="replace").strip() or f"exit {out.returncode}")[:300]
    return ""


def _ok_cmd(python: str) -> list[str]:
    return [python, "-I", "-S", "-c", "print('ok')"]


@functools.cache
def detect_isolation(backend: str | None = None) -> Isolation:
    """The isolation ``run_python`` applies here (probed once per process, then cached).

    ``backend`` (or ``REWARDS_SANDBOX_BACKEND``) forces one; a forced backend that does not work
    raises ``RuntimeError`` with the reason.
    """
    forced = backend or os.environ.get("REWARDS_SANDBOX_BACKEND") or None
    if forced is not None and forced not in BACKENDS:
        raise ValueError(f"unknown sandbox backend {forced!r}; expected one of {BACKENDS}")
    is_root = os.geteuid() == 0
    # As root, prefer a fresh unprivileged uid: file permissions then protect the host and the
    # kernel enforces the process-count limit (it never does for root).
    unpriv_python = _interpreter(True) if is_root and shutil.which("setpriv") else ""
    own_python = _interpreter(False)
    attempts = [(True, unpriv_python)] if unpriv_python else []
    attempts.append((False, own_python))
    reasons = []
    if forced in (None, "bwrap"):
        if shutil.which("bwrap") is None:
            reasons.append("bwrap not installed (Debian/Ubuntu package 'bubblewrap')")
        else:
            for drop, python in attempts:
                with tempfile.TemporaryDirectory(prefix="sbx-probe-") as src:
                    os.chmod(src, 0o755)
                    why = _probe(_bwrap_prefix(src, _Limits.default(), python, drop) + _ok_cmd(python))
                if not why:
                    limit = drop or not is_root
                    note = "bubblewrap: user/pid/net/ipc/uts namespaces, read-only root, tmpfs scratch"
                    if not limit:
                        note += "; runs as host root, so no process-count limit"
                    return Isolation("bwrap", network=True, pid_namespace=True, readonly_fs=True,
                                     separate_uid=limit, process_limit=limit, python=python,
                                     note="; ".join([note] + reasons))
                reasons.append(f"bwrap{' under a fresh uid' if drop else ''} unusable: {why}")
        if forced == "bwrap":
            raise RuntimeError("sandbox backend 'bwrap' unusable: " + "; ".join(reasons))
    if forced in (None, "unshare"):
        if shutil.which("unshare") is None:
            reasons.append("unshare (util-linux) not installed")
        else:
            for drop, python in attempts:
                why = _probe(_guard_argv() + _unshare_prefix() + (_uid_drop_argv(_random_uid()) if drop else [])
                             + _ok_cmd(python))
                if not why:
                    if drop:
                        note = "random unprivileged uid, so file permissions guard host files"
                    elif is_root:
                        note = "runs as root: host files are writable and there is no process-count limit"
                    else:
                        note = "runs as the calling user: host files it owns are writable"
                    return Isolation("unshare", network=True, pid_namespace=True, readonly_fs=False,
                                     separate_uid=drop, process_limit=drop or not is_root,
                                     python=python,
                                     note="; ".join([f"unshare: net/pid namespaces; {note}"] + reasons))
                reasons.append(f"unshare{' under a fresh uid' if drop else ''} unusable: {why}")
        if forced == "unshare":
            raise RuntimeError("sandbox backend 'unshare' unusable: " + "; ".join(reasons))
    drop = bool(unpriv_python)
    note = "no namespaces: network reachable, setsid() children may survive"
    if is_root and not drop:
        note += ", and as root there is no process-count limit"
    return Isolation("none", network=False, pid_namespace=False, readonly_fs=False,
                     separate_uid=drop, process_limit=drop or not is_root,
                     python=unpriv_python or own_python, note="; ".join([note] + reasons))


@functools.cache
def _warn_once(iso: Isolation) -> None:
    if iso.backend != "bwrap":
        log.warning("code sandbox is weaker than bubblewrap (%s): %s", iso.backend, iso.note)
    else:
        log.info("code sandbox: %s", iso.note)


def _random_uid() -> int:
    # A fresh uid per run owns no files anywhere and has its own RLIMIT_NPROC count.
    return 1_000_000_000 + secrets.randbelow(1_000_000_000)


# --------------------------------------------------------------------------- running


@dataclasses.dataclass(frozen=True)
class _Limits:
    timeout_s: float
    cpu_s: int
    memory_bytes: int
    file_bytes: int
    disk_bytes: int
    shm_bytes: int
    max_procs: int
    max_output_bytes: int

    @staticmethod
    def default() -> _Limits:
        return _Limits(10.0, 11, 512 << 20, 16 << 20, 64 << 20, 16 << 20, 32, 1 << 20)

    def prlimit_argv(self) -> list[str]:
        prlimit = shutil.which("prlimit")
        if prlimit is None:
            raise RuntimeError("prlimit (util-linux) is required to set resource limits")
        return [prlimit, f"--as={self.memory_bytes}", f"--cpu={self.cpu_s}",
                f"--fsize={self.file_bytes}", f"--nproc={self.max_procs}", "--nofile=256",
                "--core=0", "--"]


def _base_env(home: str) -> dict[str, str]:
    # Built from nothing: no variable of the caller (tokens, keys, proxies) reaches the program.
    # This is also bwrap's own environment, which its PID-1 exposes as /proc/1/environ.
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home,
            "TMPDIR": home, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}


def run_python(
    code: str,
    stdin: str | bytes | None = None,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    cpu_s: float | None = None,
    max_procs: int = 32,
    file_mb: int = 16,
    disk_mb: int = 64,
    max_output_bytes: int = 1 << 20,
    files: dict[str, str | bytes] | None = None,
    args: tuple[str, ...] | list[str] = (),
    backend: str | None = None,
) -> ExecResult:
    """Run ``code`` as ``__main__`` with the standard-library interpreter, in a sandbox.

    ``stdin`` is fed through a pipe (``None``: ``/dev/null``).  ``files`` are extra read-only files
    next to the program (``os.path.dirname(__file__)``).  The working folder (also ``HOME`` and
    ``TMPDIR``) is private, writable up to ``disk_mb`` and deleted afterwards.  The call returns
    within about ``timeout_s`` + 1 s whatever the program does.

    >>> r = run_python("print(input()[::-1])", stdin="abc\\n", timeout_s=20)
    >>> r.status, r.stdout
    ('ok', 'cba\\n')
    >>> run_python("import sys; sys.exit(3)", timeout_s=20).status
    'error'
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be str, got {type(code).__name__}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    limits = _Limits(
        timeout_s=float(timeout_s),
        cpu_s=max(1, math.ceil(cpu_s if cpu_s is not None else timeout_s)),
        memory_bytes=int(memory_mb) << 20,
        file_bytes=int(file_mb) << 20,
        disk_bytes=int(disk_mb) << 20,
        shm_bytes=min(int(disk_mb), 16) << 20,
        max_procs=int(max_procs),
        max_output_bytes=int(max_output_bytes),
    )
    iso = detect_isolation(backend)
    _warn_once(iso)
    data = stdin.encode() if isinstance(stdin, str) else stdin

    host_tmp = tempfile.mkdtemp(prefix="sbx-")
    try:
        argv, env, cwd = _prepare(host_tmp, code, files or {}, args, limits, iso)
        return _execute(argv, env, cwd, data, limits, iso)
    finally:
        shutil.rmtree(host_tmp, ignore_errors=True)


def _prepare(host_tmp, code, files, args, limits, iso):
    src = os.path.join(host_tmp, "src")
    os.mkdir(src)
    for name, content in {**files, "main.py": code}.items():
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"file names must be plain names, got {name!r}")
        mode = "w" if isinstance(content, str) else "wb"
        with open(os.path.join(src, name), mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            f.write(content)
        os.chmod(os.path.join(src, name), 0o644)
    os.chmod(host_tmp, 0o755)
    os.chmod(src, 0o755)
    py = [iso.python, "-I", "-S", "-B"]
    if iso.backend == "bwrap":
        argv = _bwrap_prefix(src, limits, iso.python, iso.separate_uid and os.geteuid() == 0)
        argv += limits.prlimit_argv() + py + [f"{_SRC_IN_SANDBOX}/main.py", *args]
        return argv, _base_env(_WORK_IN_SANDBOX), "/"
    work = os.path.join(host_tmp, "work")
    os.mkdir(work)
    argv = _guard_argv() + (_unshare_prefix() if iso.backend == "unshare" else [])
    if iso.separate_uid:
        uid = _random_uid()
        os.chown(work, uid, uid)
        argv += _uid_drop_argv(uid)
    argv += limits.prlimit_argv() + py + [os.path.join(src, "main.py"), *args]
    return argv, _base_env(work), work


def _execute(argv, env, cwd, data, limits, iso) -> ExecResult:
    start = time.monotonic()
    deadline = start + limits.timeout_s
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL if data is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
        start_new_session=True,  # our handle on the whole tree when there is no PID namespace
        close_fds=True,
    )
    out, err = bytearray(), bytearray()
    reason = ""
    truncated = False
    try:
        reason, truncated = _pump(proc, data, out, err, deadline, limits.max_output_bytes)
        if not reason:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                reason = "timeout"
    finally:
        _kill_tree(proc, iso)
    wall = time.monotonic() - start
    code = proc.returncode
    status, why = _classify(code, reason, err, iso)
    return ExecResult(status=status, exit_code=None if reason else code,
                      stdout=out.decode("utf-8", "replace"), stderr=err.decode("utf-8", "replace"),
                      wall_s=wall, isolation=iso, truncated=truncated, reason=why)


def _pump(proc, data, out, err, deadline, cap) -> tuple[str, bool]:
    """Feed stdin and drain stdout/stderr without ever blocking past ``deadline``.

    Returns (reason the run was cut short or '', whether output was truncated).
    """
    sel = selectors.DefaultSelector()
    bufs = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    pending = memoryview(data or b"")
    stdin_fd = proc.stdin.fileno() if proc.stdin is not None else -1
    if proc.stdin is not None:
        os.set_blocking(proc.stdin.fileno(), False)
        if pending:
            sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
    exited_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                return "timeout", False
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > _GRACE_S:
                break  # pipes held open by an escaped descendant (no PID namespace)
            for key, _ in sel.select(timeout=min(deadline - now, 0.05)):
                fd = key.fd
                if fd == stdin_fd:
                    try:
                        n = os.write(fd, pending[:1 << 16])
                        pending = pending[n:]
                    except BlockingIOError:
                        continue
                    except (BrokenPipeError, OSError):
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    continue
                buf = bufs[fd]
                if len(buf) + len(chunk) > cap:
                    buf += chunk[: cap - len(buf)]
                    return "output limit", True
                buf += chunk
    finally:
        sel.close()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None and not f.closed:
                f.close()
    return "", False


def _procs_where(field: int, value: int) -> list[int]:
    """PIDs whose /proc/<pid>/stat field (counted after the command name: 1 = ppid, 2 = pgrp)
    equals ``value``.  /proc/<pid>/task/*/children is often compiled out, so scan."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[field]) == value and fields[0] not in (b"Z", b"X"):
            found.append(int(name))
    return found


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except OSError:
        return True


def _kill_tree(proc: subprocess.Popen, iso: Isolation) -> None:
    """SIGKILL everything the run started and wait until the kernel has torn it down."""
    if proc.poll() is None:
        # The namespace's PID 1 is a child of bwrap/unshare; killing it directly (not only through
        # PR_SET_PDEATHSIG, which is asynchronous) lets us wait until the namespace is empty:
        # the kernel reaps a namespace's PID 1 only after every other process in it is gone.
        inits = _procs_where(1, proc.pid) if iso.pid_namespace else []
        for pid in inits:
            _signal(pid, signal.SIGKILL)
        _signal(-proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - the kernel ignored SIGKILL
            log.error("sandbox process %d did not die after SIGKILL", proc.pid)
        _wait_until(lambda: all(_gone(p) for p in inits))
    if not iso.pid_namespace:
        # No namespace: the process group is all we hold (children that called setsid() escape).
        _signal(-proc.pid, signal.SIGKILL)
        _wait_until(lambda: not _procs_where(2, proc.pid))


def _signal(pid: int, sig: int) -> None:
    try:
        if pid < 0:
            os.killpg(-pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_until(done, limit_s: float = 2.0) -> None:
    end = time.monotonic() + limit_s
    while not done() and time.monotonic() < end:
        time.sleep(0.005)


def _classify(code, reason, err: bytearray, iso: Isolation) -> tuple[str, str]:
    if reason == "timeout":
        return "timeout", "wall-clock limit"
    if reason:
        return "killed", reason
    if code == 0:
        return "ok", ""
    tail = bytes(err[-4096:])
    if b"MemoryError" in tail or b"Cannot allocate memory" in tail:
        return "memory", "address-space limit"
    if b"File too large" in tail:
        return "error", "file-size limit"
    # Through bwrap a signal shows as 128+N; directly as -N.
    sig = -code if code < 0 else code - 128 if code > 128 and iso.backend == "bwrap" else 0
    if sig == signal.SIGXCPU:
        return "timeout", "CPU-time limit"
    if sig == signal.SIGXFSZ:
        return "killed", "file-size limit"
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return "killed", name
    return "error", f"exit code {code}"
