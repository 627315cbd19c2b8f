"""``align submit``: run a stage recipe as a Ray Job on a running cluster; ``align jobs``: list / status / logs / stop.

Submitting validates the recipe here first (a bad key fails before anything is uploaded), zips the working folder
minus outputs and caches (``ray_jobs/runtime_env.yaml``), checks the zip against Ray's upload limit, and starts

    align <stage> --config <recipe> <overrides...> output_dir=<storage>/<job id> [ray.address=auto]

as the job's entrypoint.  ``output_dir`` always points at the storage path, because the job's working folder is
a temporary copy on whichever node runs the driver.  GRPO gets ``ray.address=auto`` so its rollout pool joins the
cluster the job runs on instead of starting a private Ray inside the job.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import importlib.util
import json
import logging
import os
import shlex
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

import yaml

from ray_jobs import jobs as jobs_mod
from ray_jobs.jobs import JobsError

log = logging.getLogger(__name__)

RUNTIME_ENV_FILE = Path(__file__).with_name("runtime_env.yaml")
# Recipes from outside the working folder (or from an excluded folder, like a lock file in outputs/) are added to
# the upload here.
EXTRA_DIR = ".align-submit"
# Ray's job server takes uploads up to 100 MiB (dashboard client_max_size) and stores them in the GCS, whose
# gRPC message limit is the other bound.
HTTP_UPLOAD_LIMIT = 100 * 1024**2


def configure_parser(parser, command: str) -> None:
    if command == "jobs":
        jobs_mod.configure_parser(parser)
        return
    import argparse

    try:
        excludes = _read_runtime_env(RUNTIME_ENV_FILE).get("excludes", [])
    except JobsError as e:  # `align --help` must work even with a broken runtime env file
        excludes = [f"(unreadable: {e})"]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Run a stage recipe as a Ray Job on a running cluster.  The recipe is validated here, the working folder\n"
        "is uploaded, and the job runs `align <stage> --config <recipe> <overrides> output_dir=<storage>/<job id>`."
    )
    parser.epilog = (
        "not uploaded (ray_jobs/runtime_env.yaml `excludes`, plus .gitignore / .rayignore):\n  "
        + " ".join(excludes)
        + "\n\nstorage: a folder every node sees at the same path (written directly), or an fsspec URI such as\n"
          "s3://bucket/runs (the stage writes on the driver's node, then the job copies the folder there).\n"
          "Without --storage, a cluster on this machine writes to <working folder>/outputs/ray/<job id>;\n"
          "a remote cluster is refused, since its outputs would land in a node's temporary folder.\n\n"
          "token authentication: when the cluster asks for a token it is read from $RAY_AUTH_TOKEN,\n"
          "the file named by $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (the order Ray uses).\n\n"
          "See docs/ray.md."
    )
    parser.add_argument("--config", required=True, help="stage recipe YAML (or a recipe.lock.yaml); the stage "
                        "comes from the file name (sft.yaml, grpo_*.yaml, ...) or the lock")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys")
    jobs_mod.add_address_arg(parser)
    parser.add_argument("--storage", metavar="PATH_OR_URI",
                        help="where outputs go: shared folder or fsspec URI (required for a remote cluster)")
    parser.add_argument("--name", help="job id, also the output folder's name under the storage "
                        "(default: <stage>-<date>-<time>-<random>)")
    parser.add_argument("--follow", "-f", action="store_true",
                        help="stream the job's logs; exit 0 if it SUCCEEDED, 1 if it FAILED or was STOPPED")
    parser.add_argument("--resume", action="store_true",
                        help="continue the unfinished run in <storage>/<name> (needs --name and a folder storage)")
    parser.add_argument("--allow-drift", action="store_true", help="passed to the stage (lock files only)")
    parser.add_argument("--pip-pin", action="store_true",
                        help="have Ray install the locally installed versions of the locked packages "
                        "(torch, transformers, trl, ...) in a per-job virtualenv on the cluster; by default the job "
                        "runs in the Python environment the cluster nodes already have")
    parser.add_argument("--runtime-env", type=Path, default=RUNTIME_ENV_FILE, metavar="YAML",
                        help=f"runtime env to start from (default: {RUNTIME_ENV_FILE.name} next to this module)")
    parser.add_argument("--working-dir", type=Path, default=Path("."),
                        help="folder to upload; recipe paths are relative to it (default: current folder)")
    parser.add_argument("--accelerate-config", type=Path, metavar="YAML",
                        help="start the stage with `accelerate launch --config_file YAML` (e.g. "
                        "recipes/accelerate/fsdp2.yaml) for a multi-GPU learner; reserve its GPUs with "
                        "--entrypoint-num-gpus")
    parser.add_argument("--entrypoint-num-cpus", type=float, default=None,
                        help="CPUs reserved for the driver (the learner); Ray places it on a node that has them")
    parser.add_argument("--entrypoint-num-gpus", type=float, default=None,
                        help="GPUs reserved for the driver, e.g. 8 to put the learner on a full GPU node")
    parser.add_argument("--entrypoint-resources", type=json.loads, default=None, metavar="JSON",
                        help='custom resources for the driver, e.g. \'{"learner": 1}\' (see ray_jobs/cluster.yaml)')
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and package, print the entrypoint and runtime env, submit nothing")


def cli_main(args) -> int:
    if not (args.command == "jobs" and args.action == "upload"):  # the copy step runs on nodes, Ray or not
        try:
            import ray  # noqa: F401  (importing ray configures its loggers; quieten them afterwards)
        except ModuleNotFoundError:
            print("align: error: `align submit` and `align jobs` need Ray's job client: "
                  "pip install -e '.[ray]' (ray[default])", file=sys.stderr)
            return 1
        if not args.verbose:
            # Ray's SDK logs every packaging and websocket step at INFO, and its modules pin their own loggers to
            # INFO, so the filter goes on the handler they all end in; the command prints what matters itself.
            for handler in logging.getLogger("ray").handlers:
                handler.setLevel(logging.WARNING)
    try:
        if args.command == "submit":
            return submit(args)
        return jobs_mod.main(args)
    except KeyboardInterrupt:
        print("\nalign: interrupted", file=sys.stderr)
        return 130
    except JobsError as e:
        print(f"align: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # storage copy failures, unreadable runtime env files
        print(f"align: error: {e}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------------------------
# Submitting


def _read_runtime_env(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise JobsError(f"runtime env {path}: {e}") from None
    if not isinstance(raw, dict):
        raise JobsError(f"runtime env {path}: expected a mapping of runtime_env fields")
    if "working_dir" in raw:
        raise JobsError(f"runtime env {path}: working_dir is set by `align submit` (--working-dir)")
    return raw


def _import_stages() -> dict[str, str]:
    """Import the stage modules (they register their recipe types); returns recipe stage -> `align` command."""
    from align.cli import RECIPE_STAGES

    commands = {}
    for command, entry in RECIPE_STAGES.items():
        module, stage = entry[0], (entry[2] if len(entry) > 2 else command)
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
            commands[stage] = command
    return commands


def stage_for(config: Path) -> str:
    from align import recipe as recipes

    raw = recipes.read_yaml(config)
    if {"sha256", "recipe", "versions"} <= set(raw) and raw.get("stage"):
        return raw["stage"]
    return recipes.stage_of(config)


def default_name(stage: str) -> str:
    # Ray submission ids must be unique on a cluster; the id also names the output folder.
    return f"{stage}-{datetime.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def _override_keys(overrides: list[str]) -> set[str]:
    return {o.partition("=")[0].strip() for o in overrides}


def _path_fields(obj, prefix: str = "", in_list: bool = False):
    """(dotted key, value, settable from the command line) for each local path the recipe names.

    The same fields `align.recipe.check_paths` checks; list items (data sources) cannot be overridden as
    ``key.sub=value``, so they can only be checked, not rewritten.
    """
    from align.recipe import _is_local_path

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _path_fields(value, key + ".", in_list)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if dataclasses.is_dataclass(v):
                    yield from _path_fields(v, f"{key}[{i}].", True)
        elif f.name in ("path", "heldout_math", "tokenizer") and isinstance(value, str) and _is_local_path(value):
            yield key, value, not in_list


def build_package(working_dir: Path, excludes: list[str], out: Path) -> Path:
    """Zip the working folder exactly as Ray would (its default excludes, ``excludes``, .gitignore, .rayignore)."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    all_excludes = ray_constants.get_runtime_env_default_excludes() + list(excludes)
    create_package(str(working_dir), out, include_gitignore=include_gitignore, excludes=all_excludes)
    return out


def add_files(package: Path, extra: dict[str, Path]) -> None:
    with zipfile.ZipFile(package, "a", compression=zipfile.ZIP_DEFLATED) as z:
        for arcname, path in extra.items():
            z.write(path, arcname)


def check_size(package: Path, working_dir: Path) -> None:
    """Fail here, naming the biggest parts, rather than with an HTTP 413 from the job server."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    size, limit = package.stat().st_size, min(HTTP_UPLOAD_LIMIT, GCS_STORAGE_MAX_SIZE)
    if size < limit:
        return
    parts: dict[str, int] = {}
    with zipfile.ZipFile(package) as z:
        for item in z.infolist():
            top = item.filename.split("/")[0] + ("/" if "/" in item.filename else "")
            parts[top] = parts.get(top, 0) + item.compress_size
    biggest = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:5])
    raise JobsError(
        f"the working folder {working_dir} zips to {size / 2**20:.1f} MiB, over Ray's {limit / 2**20:.0f} MiB "
        f"limit for a job upload (largest: {biggest}). Exclude what the job does not need (.rayignore, or "
        "`excludes` in the runtime env), or put large data on the storage path and point the recipe at it")


@dataclasses.dataclass
class Plan:
    stage: str
    job_id: str
    entrypoint: str
    runtime_env: dict
    metadata: dict
    output: str
    sha256: str
    package: Path
    package_files: int


def plan_submission(args, local_cluster: bool, tmp: Path) -> Plan:
    """Everything `submit` sends, computed and checked without contacting the cluster."""
    from align import recipe as recipes

    from ray_jobs import storage as storage_mod

    working_dir = args.working_dir.resolve()
    if not working_dir.is_dir():
        raise JobsError(f"--working-dir {working_dir}: not a folder")
    config = Path(args.config).expanduser().absolute()
    accelerate_config = args.accelerate_config.expanduser().absolute() if args.accelerate_config else None
    runtime_env = _read_runtime_env(args.runtime_env.expanduser().absolute())
    # A relative --storage means the folder the user is in, not the working folder.
    storage = storage_mod.resolve(args.storage) if args.storage else None
    # Recipe paths are relative to the working folder, which is the job's current folder on the cluster.
    os.chdir(working_dir)

    overrides = list(args.overrides)
    if "output_dir" in _override_keys(overrides):
        raise JobsError("output_dir is chosen by `align submit` (--storage and --name), not by an override")
    if args.storage is None and not local_cluster:
        raise JobsError(
            f"--storage is required for the cluster at {args.address_url}: not all of its nodes are this machine, "
            "and without a "
            "shared storage path the run would be written to a temporary folder on whichever node runs the driver. "
            "Pass a folder mounted at the same path on every node (NFS, EFS, Lustre) or an fsspec URI "
            "(s3://bucket/runs, gs://bucket/runs)")
    commands = _import_stages()
    stage = stage_for(config)
    if stage not in commands:
        raise JobsError(f"{args.config}: stage {stage!r} has no `align` command here")
    storage = storage or storage_mod.resolve(str(working_dir / "outputs" / "ray"))
    name = args.name or default_name(stage)
    # Ray never reuses a submission id, so a resumed run is a new job writing into the old job's folder.
    job_id = f"{name}-resume-{uuid.uuid4().hex[:6]}" if args.resume else name
    if args.resume and (not args.name or storage.is_uri):
        raise JobsError("--resume continues <storage>/<name>: it needs --name and a folder --storage "
                        "(a URI storage only receives finished folders)")
    if not args.resume and not storage.is_uri and Path(storage.output_for(name)).exists() \
            and any(Path(storage.output_for(name)).iterdir()):
        raise JobsError(f"{storage.output_for(name)} already holds a run; choose another --name "
                        "(or pass --resume to continue it)")

    # First pass: types and keys only; the paths are checked against what the upload will hold.
    loaded = recipes.load(stage, config, overrides, allow_drift=args.allow_drift, check_files=False)

    package = build_package(working_dir, runtime_env.get("excludes", []), tmp / "working_dir.zip")
    extra: dict[str, Path] = {}
    with zipfile.ZipFile(package) as z:
        names = set(z.namelist())

    def ship(path: Path) -> str:
        """The file's path inside the upload, adding it when the working folder's zip does not hold it."""
        try:
            rel = path.relative_to(working_dir).as_posix()
        except ValueError:
            rel = None
        if rel is None or rel not in names:
            rel = f"{EXTRA_DIR}/{job_id}/{path.name}"
            extra[rel] = path
        return rel

    config_arg = ship(config)
    launcher = ["align"]
    if args.accelerate_config:
        if not accelerate_config.is_file():
            raise JobsError(f"--accelerate-config {args.accelerate_config}: file not found")
        launcher = ["accelerate", "launch", "--config_file", ship(accelerate_config), "-m", "align"]

    def uploaded(rel: str) -> bool:
        rel = Path(os.path.normpath(rel)).as_posix()
        return rel in names or any(n.startswith(rel + "/") for n in names)

    extra_overrides: list[str] = []
    for key, value, settable in _path_fields(loaded.recipe):
        if os.path.isabs(value):
            continue  # a path on the cluster's filesystem; checked below when the cluster is this machine
        if uploaded(value):
            continue
        here = working_dir / value
        if local_cluster and settable and here.exists():
            # e.g. model.path=outputs/tiny/sft: outputs/ is not uploaded, but the driver runs on this machine.
            extra_overrides.append(f"{key}={here}")
            continue
        if not here.exists():
            raise JobsError(f"{args.config}: {key}: file not found: {value}")
        raise JobsError(
            f"{args.config}: {key}: {value} is not part of the upload (excluded by runtime env `excludes`, "
            ".gitignore or .rayignore), so the job would not find it. "
            + ("Point it at the storage path or a hub id." if settable else
               "Move it out of the excluded folders or give an absolute path on shared storage."))

    extra_overrides.append(f"output_dir={storage.stage_output_dir(name)}")
    if hasattr(loaded.recipe, "ray"):
        # The job runs inside the cluster: join it (Ray sets RAY_ADDRESS for the driver) instead of starting a
        # private Ray with no access to the cluster's nodes.
        extra_overrides.append("ray.address=auto")
    # A key set here replaces the user's override of it rather than following it, so the entrypoint reads plainly.
    mine = _override_keys(extra_overrides)
    final_overrides = [o for o in overrides if o.partition("=")[0].strip() not in mine] + extra_overrides
    # Second pass with everything the job will see, so the sha256 recorded here is the one its lock will hold.
    loaded = recipes.load(stage, config, final_overrides, allow_drift=args.allow_drift, check_files=local_cluster)

    add_files(package, extra)
    check_size(package, working_dir)
    with zipfile.ZipFile(package) as z:
        n_files = sum(1 for i in z.infolist() if not i.is_dir())

    cmd = [*launcher, commands[stage], "--config", config_arg, *final_overrides]
    if args.resume:
        cmd.append("--resume")
    if args.allow_drift:
        cmd.append("--allow-drift")
    entrypoint = shlex.join(cmd)
    output = storage.output_for(name)
    if storage.is_uri:
        staging = storage.stage_output_dir(name)
        check = shlex.join(["align", "jobs", "upload", "--check", staging, storage.root])
        copy = shlex.join(["align", "jobs", "upload", staging, output])
        # Copy whatever the stage wrote even when it failed: checkpoints of a failed run are worth keeping.
        entrypoint = f"{check} && {{ {entrypoint}; rc=$?; {copy} || rc=1; exit $rc; }}"

    runtime_env = dict(runtime_env)
    runtime_env["working_dir"] = str(package)
    runtime_env.pop("excludes", None)  # already applied to the zip
    if args.pip_pin:
        runtime_env["pip"] = {"packages": pip_pins(), "pip_check": False}
    versions = recipes.package_versions()
    metadata = {
        "align_stage": stage,
        "align_recipe": str(args.config),
        "align_recipe_sha256": loaded.sha256,
        "align_output": output,
        "align_overrides": json.dumps(final_overrides),
        "align_versions": json.dumps(versions, sort_keys=True),
        # The upload has no .git, so the job's lock cannot name the commit; the submitter's checkout can.
        "align_git_commit": recipes.git_commit() or "",
    }
    return Plan(stage, job_id, entrypoint, runtime_env, metadata, output, loaded.sha256, package, n_files)


def pip_pins() -> list[str]:
    """The lock's packages at the versions installed here, as pip requirements."""
    from align.recipe import package_versions

    pins = []
    for name, version in package_versions().items():
        if name == "align" or version is None:
            continue  # align is the uploaded working folder itself
        # A local label (+cpu, +cu128) names a build from a non-PyPI index; `==2.13.0` still accepts such a build
        # where it is installed and picks the index's default build elsewhere (CUDA wheels on GPU nodes).
        pins.append(f"{name}=={version.split('+')[0]}")
    return pins


def submit(args) -> int:
    address = args.address or jobs_mod.default_address()
    args.address_url = address
    conn = None
    if not args.dry_run:
        conn = jobs_mod.connect(address)  # an unreachable cluster or a missing token fails before any work
        args.address_url = conn.url
        local = jobs_mod.is_local_cluster(conn)
    else:
        local = jobs_mod.is_local_address(address if "://" in address else f"http://{address}")
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="align-submit-") as tmp:
        try:
            plan = plan_submission(args, local, Path(tmp))
        finally:
            os.chdir(cwd)
        size = plan.package.stat().st_size
        print(f"align: {plan.stage} recipe {args.config} is valid (sha256 {plan.sha256[:12]}); uploading "
              f"{plan.package_files} files ({size / 2**20:.2f} MiB)", file=sys.stderr)
        if args.dry_run:
            shown = {**plan.runtime_env, "working_dir": f"<zip of {args.working_dir.resolve()}>"}
            print(json.dumps({"submission_id": plan.job_id, "entrypoint": plan.entrypoint, "output": plan.output,
                              "runtime_env": shown, "metadata": plan.metadata}, indent=2))
            return 0
        if conn.server_ray_version and conn.server_ray_version != _ray_version():
            log.warning("the cluster runs Ray %s, this machine Ray %s; job submission works across versions but "
                        "the job's packages come from the cluster", conn.server_ray_version, _ray_version())
        kwargs = {k: v for k, v in (("entrypoint_num_cpus", args.entrypoint_num_cpus),
                                    ("entrypoint_num_gpus", args.entrypoint_num_gpus),
                                    ("entrypoint_resources", args.entrypoint_resources)) if v is not None}
        job_id = jobs_mod.call(
            lambda: conn.client.submit_job(entrypoint=plan.entrypoint, submission_id=plan.job_id,
                                           runtime_env=plan.runtime_env, metadata=plan.metadata, **kwargs),
            conn.url, conn.token_source)
    print(job_id, flush=True)
    print(f"align: submitted {job_id} to {conn.url}\n"
          f"align:   outputs: {plan.output}\n"
          f"align:   logs:    align jobs logs {job_id} --follow --address {conn.url}", file=sys.stderr)
    if not args.follow:
        return 0
    rc = jobs_mod.follow(conn, job_id)
    if rc == 0:
        _report_drift(plan.output)
    return rc


def _ray_version() -> str:
    import ray

    return ray.__version__


def _report_drift(output: str) -> None:
    """Say so when the cluster ran different package versions than this machine has (the lock records them)."""
    from align.recipe import LOCK_NAME, package_versions

    lock = Path(output) / LOCK_NAME
    if "://" in output or not lock.is_file():
        return
    ran = (yaml.safe_load(lock.read_text()) or {}).get("versions", {})
    here = package_versions()
    drift = {k: (v, here.get(k)) for k, v in ran.items() if k != "align" and here.get(k) != v}
    for k, (cluster, local) in drift.items():
        log.warning("the job ran %s %s, this machine has %s (see --pip-pin in docs/ray.md)", k, cluster, local)
