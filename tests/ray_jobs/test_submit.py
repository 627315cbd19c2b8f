"""`align submit` / `align jobs` against a real Ray head on 127.0.0.1 with token authentication on.

The head gets its own temp dir and free ports, so no other Ray on the machine is joined or disturbed, and it is
torn down (process group, then any process still living in its temp dir) even when a test fails.
"""

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray.job_submission")

ROOT = Path(__file__).resolve().parents[2]


def _align_helpers():
    # conftest modules are not importable by name under --import-mode=importlib; load the shared one by path.
    spec = importlib.util.spec_from_file_location("align_test_helpers", ROOT / "tests/align/conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def align_process(*args, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """`align ...` as a user runs it: its own process, exit code, stdout and stderr."""
    return subprocess.run([sys.executable, "-m", "align", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def align(*args, env: dict) -> subprocess.CompletedProcess:
    """`align ...` in this process (each new process would pay seconds of imports on a busy 2-core machine).

    Same exit code and output as a process, and any exception that escapes is a traceback the user would see.
    """
    import contextlib
    import io

    from align.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in args])
            except SystemExit as e:  # argparse errors
                rc = e.code
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# Fast checks, no cluster


def test_token_is_found_where_ray_looks(tmp_path, monkeypatch):
    from ray_jobs import jobs

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setattr(jobs, "DEFAULT_TOKEN_FILE", tmp_path / "auth_token")
    assert jobs.find_token() is None
    (tmp_path / "auth_token").write_text("from-default-file\n")
    assert jobs.find_token() == ("from-default-file", str(tmp_path / "auth_token"))
    (tmp_path / "other").write_text("from-path-env")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "other"))
    assert jobs.find_token()[0] == "from-path-env"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.find_token() == ("from-env", "$RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(jobs.JobsError, match="cannot be read"):
        jobs.find_token()


def test_local_addresses():
    from ray_jobs.jobs import is_local_address

    assert is_local_address("http://127.0.0.1:8265") and is_local_address("http://localhost:8265")
    assert not is_local_address("http://203.0.113.77:8265")  # TEST-NET-3: documentation only, never a host


def test_uri_storage_copy_keeps_layout_and_removes_staging(tmp_path):
    from ray_jobs import storage

    src = tmp_path / "run"
    (src / "checkpoint-2").mkdir(parents=True)
    (src / "metrics.json").write_text("{}")
    (src / "checkpoint-2" / "model.safetensors").write_bytes(b"x" * 10)
    dest = f"file://{tmp_path}/bucket/job-1"
    storage.check_writable(f"file://{tmp_path}/bucket")
    assert storage.upload(src, dest) == 2
    assert (tmp_path / "bucket/job-1/checkpoint-2/model.safetensors").read_bytes() == b"x" * 10
    assert not src.exists()
    with pytest.raises(OSError, match="nosuchproto"):
        storage.check_writable("nosuchproto://bucket/runs")


def test_pip_pins_drop_local_build_labels():
    from ray_jobs.submit import pip_pins

    pins = pip_pins()
    assert any(p.startswith("torch==") for p in pins) and not any("+" in p for p in pins)
    assert not any(p.startswith("align==") for p in pins)


# ---------------------------------------------------------------------------------------------------------------
# A real head


def _my_pids(marker: str) -> list[int]:
    """Processes whose command line or current folder lies in this head's unique temp dir (started by us)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if marker in cmdline or cwd.startswith(marker):
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def head():
    import requests

    temp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's unix sockets live under it (108-byte limit)
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               TOKENIZERS_PARALLELISM="false", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    dash = _free_port()
    cmd = ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", _free_port(),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", dash, "--num-cpus", "2", "--disable-usage-stats",
           "--temp-dir", temp, "--ray-client-server-port", _free_port(),
           "--dashboard-agent-listen-port", _free_port(), "--dashboard-agent-grpc-port", _free_port(),
           "--metrics-export-port", _free_port(), "--runtime-env-agent-port", _free_port()]
    log = open(Path(temp) / "head.log", "w")
    proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    auth = {"Authorization": f"Bearer {token}"}
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{url}/api/jobs/", headers=auth, timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray head did not come up:\n{(Path(temp) / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        # Clients get the token but not RAY_AUTH_MODE: `align` must send it because the cluster asks for it.
        client_env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
        yield {"url": url, "env": client_env, "token": token, "temp": temp}
    finally:
        try:  # stop jobs first so their drivers (own process groups) exit cleanly
            for job in requests.get(f"{url}/api/jobs/", headers=auth, timeout=5).json():
                if job.get("status") in ("PENDING", "RUNNING") and job.get("submission_id"):
                    requests.post(f"{url}/api/jobs/{job['submission_id']}/stop", headers=auth, timeout=5)
        except Exception:
            pass
        # `ray start --block` shuts its own children down on SIGTERM; whatever is left is killed by id.
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in _my_pids(temp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    helpers = _align_helpers()
    out = tmp_path_factory.mktemp("sft") / "sft"
    helpers.run_align("sft", "--config", helpers.write_recipe(out.parent / "sft.yaml", helpers.micro_sft(out, 4)))
    return out


GRPO_TINY = ["trainer.per_device_train_batch_size=8", "trainer.num_generations=4", "eval.limit=4", "eval.samples=1",
             "curves.limit=4", "curves.samples=1", "rollout.workers=1", "trainer.report_to=[]",
             "trainer.disable_tqdm=true"]


@pytest.mark.slow
def test_submit_follow_writes_the_run_to_storage(head, sft_dir, tmp_path):
    store, env, url = tmp_path / "store", head["env"], head["url"]
    res = align_process("submit", "--address", url, "--config", "recipes/tiny/grpo.yaml", "--storage", store,
                        "--follow", f"model.path={sft_dir}", "trainer.max_steps=2", *GRPO_TINY, env=env)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    job_id = res.stdout.splitlines()[0]
    assert job_id.startswith("grpo-") and "SUCCEEDED" in res.stderr and "Traceback" not in res.stderr
    out = store / job_id
    assert {"metrics.json", "recipe.lock.yaml", "model.safetensors", "checkpoint-2"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    lock = yaml.safe_load((out / "recipe.lock.yaml").read_text())
    assert metrics["global_step"] == 2 and metrics["recipe_sha256"] == lock["sha256"]
    # The job joined the cluster it ran on: its rollout actor is a worker of this head, not an embedded Ray.
    assert lock["recipe"]["ray"]["address"] == "auto" and lock["recipe"]["output_dir"] == str(out)
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    # Every group came from that worker; dynamic sampling (on in the recipe) may add refill rounds of other sizes.
    assert rollouts and all(r["workers"] == {"rollout-worker-0": r["groups"]} for r in rollouts)
    assert [r["groups"] for r in rollouts if r["step"] == 0][0] == 2     # each step starts with its own batch

    listing = align("jobs", "list", "--address", url, env=env)
    row = next(line for line in listing.stdout.splitlines() if line.startswith(job_id))
    assert "SUCCEEDED" in row and "grpo" in row and str(out) in row
    status = align("jobs", "status", job_id, "--address", url, env=env)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    assert f"recipe sha256: {lock['sha256']}" in status.stdout  # what was submitted is what ran
    logs = align("jobs", "logs", job_id, "--address", url, env=env)
    assert logs.returncode == 0 and "held-out math" in logs.stdout


@pytest.mark.slow
def test_stop_a_running_job(head, sft_dir, tmp_path):
    env, url = head["env"], head["url"]
    # A recipe outside the working folder travels with the upload.
    recipe = tmp_path / "grpo_long.yaml"
    shutil.copy(ROOT / "recipes/tiny/grpo.yaml", recipe)
    res = align("submit", "--address", url, "--config", recipe, "--storage", tmp_path / "store", "--name", "long-1",
                f"model.path={sft_dir}", "trainer.max_steps=5000", "trainer.logging_steps=1", *GRPO_TINY, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "long-1", res.stderr[-3000:]
    assert ".align-submit/long-1/grpo_long.yaml" in align("jobs", "status", "long-1", "--address", url,
                                                          env=env).stdout
    deadline = time.monotonic() + 300
    while "'loss'" not in align("jobs", "logs", "long-1", "--address", url, env=env).stdout:  # training steps
        assert time.monotonic() < deadline, align("jobs", "logs", "long-1", "--address", url, env=env).stdout[-3000:]
        time.sleep(3)
    res = align("jobs", "stop", "long-1", "--address", url, env=env)
    assert res.returncode == 0 and "STOPPED" in res.stdout, res.stderr
    assert "STOPPED" in align("jobs", "status", "long-1", "--address", url, env=env).stdout
    assert not (tmp_path / "store/long-1/metrics.json").exists()
    follow = align("jobs", "logs", "long-1", "--follow", "--address", url, env=env)
    assert follow.returncode == 1 and "STOPPED" in follow.stderr


@pytest.mark.slow
def test_clear_errors(head, tmp_path):
    env, url = head["env"], head["url"]
    dead = f"http://127.0.0.1:{_free_port()}"
    res = align("jobs", "list", "--address", dead, env=env)
    assert res.returncode == 1 and "cannot reach a Ray cluster" in res.stderr and "Traceback" not in res.stderr
    res = align("jobs", "status", "no-such-job", "--address", url, env=env)
    assert res.returncode == 1 and "no job 'no-such-job'" in res.stderr and "Traceback" not in res.stderr
    res = align("jobs", "stop", "no-such-job", "--address", url, env=env)
    assert res.returncode == 1 and "no job" in res.stderr
    # No token anywhere Ray would look: say where to put it.
    bare = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    bare["HOME"] = str(tmp_path)
    res = align("jobs", "list", "--address", url, env=bare)
    assert res.returncode == 1 and "requires an authentication token" in res.stderr and "RAY_AUTH_TOKEN" in res.stderr
    res = align("jobs", "list", "--address", url, env={**env, "RAY_AUTH_TOKEN": "not-the-token"})
    assert res.returncode == 1 and "rejected the token" in res.stderr
    # A remote cluster without storage is refused before anything is uploaded (dry run: nothing is contacted).
    res = align("submit", "--dry-run", "--address", "http://203.0.113.77:8265", "--config", "recipes/tiny/grpo.yaml",
                env=env)
    assert res.returncode == 1 and "--storage is required" in res.stderr
    # A bad recipe fails here, before the upload: no job appears on the cluster.
    before = align("jobs", "list", "--address", url, env=env).stdout
    res = align("submit", "--address", url, "--config", "recipes/tiny/grpo.yaml", "trainer.no_such_option=1", env=env)
    assert res.returncode == 2 and "trainer.no_such_option" in res.stderr
    assert align("jobs", "list", "--address", url, env=env).stdout.count("\n") == before.count("\n")


@pytest.mark.slow
def test_failing_job_exits_nonzero_with_its_reason(head):
    env, url = head["env"], head["url"]
    # The job checks its URI storage before training; a protocol no fsspec backend serves fails it at once.
    res = align("submit", "--address", url, "--config", "recipes/tiny/grpo.yaml", "--storage", "nosuchproto://runs",
                "--follow", "trainer.max_steps=2", *GRPO_TINY, env=env)
    assert res.returncode == 1
    job_id = res.stdout.splitlines()[0]
    assert "nosuchproto" in res.stdout  # the job's own error, streamed from its logs
    tail = res.stderr.strip().splitlines()[-1]
    assert tail.startswith(f"align: job {job_id} FAILED: ") and "exit code 1" in tail, res.stderr[-2000:]
    assert "FAILED" in align("jobs", "status", job_id, "--address", url, env=env).stdout


@pytest.mark.slow
def test_dry_run_shows_what_would_run(tmp_path):
    # A small working folder of its own: a recipe, the math data, and a checkpoint in the excluded outputs/.
    work = tmp_path / "work"
    shutil.copytree(ROOT / "data/math", work / "data/math")
    shutil.copy(ROOT / "recipes/tiny/grpo.yaml", work / "grpo.yaml")
    (work / "outputs/sft").mkdir(parents=True)
    (work / "outputs/sft/config.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    common = ["submit", "--dry-run", "--working-dir", work, "--config", work / "grpo.yaml", "model.path=outputs/sft"]

    # A cluster on this machine: the excluded checkpoint is passed by its absolute path, outputs go under the folder.
    res = align(*common, "--address", "http://127.0.0.1:8265", env=env)
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    job = plan["submission_id"]
    assert plan["output"] == f"{work}/outputs/ray/{job}"
    assert plan["entrypoint"] == (f"align grpo --config grpo.yaml model.path={work}/outputs/sft "
                                  f"output_dir={work}/outputs/ray/{job} ray.address=auto")
    assert plan["runtime_env"]["env_vars"]["TOKENIZERS_PARALLELISM"] == "false" and "pip" not in plan["runtime_env"]

    # A remote cluster cannot see outputs/ here: refused, naming the key.
    res = align(*common, "--address", "http://203.0.113.77:8265", "--storage", "s3://bucket/runs", env=env)
    assert res.returncode == 1 and "model.path: outputs/sft is not part of the upload" in res.stderr

    # URI storage: check, run under a staging folder, copy; a multi-GPU learner through accelerate; pinned packages.
    res = align("submit", "--dry-run", "--working-dir", work, "--config", work / "grpo.yaml", "--address",
                "http://203.0.113.77:8265", "--storage", "s3://bucket/runs/", "--name", "g1", "--pip-pin",
                "--accelerate-config", ROOT / "recipes/accelerate/ddp.yaml", "model.path=org/some-hub-model",
                env=env)
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["output"] == "s3://bucket/runs/g1"
    assert plan["entrypoint"] == (
        "align jobs upload --check /tmp/align-jobs/g1 s3://bucket/runs && { accelerate launch --config_file "
        ".align-submit/g1/ddp.yaml -m align grpo --config grpo.yaml model.path=org/some-hub-model "
        "output_dir=/tmp/align-jobs/g1 ray.address=auto; rc=$?; align jobs upload /tmp/align-jobs/g1 "
        "s3://bucket/runs/g1 || rc=1; exit $rc; }")
    pins = plan["runtime_env"]["pip"]["packages"]
    assert any(p.startswith("trl==") for p in pins) and not any(p.startswith("align") for p in pins)
