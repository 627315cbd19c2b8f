"""Talking to a Ray cluster's job server: address, token authentication, and `align jobs list|status|logs|stop`.

Everything goes through ``ray.job_submission.JobSubmissionClient``.  What this module adds is what the bare client
leaves to the user: an explicit ``--address`` that wins over ``$RAY_ADDRESS`` (the client lets the environment win),
the cluster's token sent whenever the cluster asks for one (the client only sends it when ``RAY_AUTH_MODE=token``
is set locally), and one clear sentence instead of a traceback for each way a request can fail.

Ray is imported inside functions: ``align --help`` and every other ``align`` command load this module.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Ray reads the token from these, in this order (ray/_raylet: AuthenticationTokenLoader).
TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")


class JobsError(Exception):
    """A request the cluster cannot serve; the message says what is wrong and what to do."""


def default_address() -> str:
    """``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS``, else the dashboard on this machine."""
    return os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def add_address_arg(p) -> None:
    p.add_argument("--address", default=None,
                   help="the cluster's dashboard URL, e.g. http://<head>:8265 (default: $RAY_API_SERVER_ADDRESS, "
                        f"$RAY_ADDRESS, or {DEFAULT_ADDRESS}); a bare host:port or `auto` is resolved the way Ray "
                        "does, through the cluster's GCS")


@contextlib.contextmanager
def _without_address_env():
    """Ray's client lets $RAY_ADDRESS override the address it is given; here the command line wins."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def resolve_address(address: str) -> str:
    """The dashboard's HTTP URL for ``address``."""
    address = address.strip().rstrip("/")
    if address.startswith(("http://", "https://")):
        return address
    from ray.dashboard.utils import get_address_for_submission_client

    try:
        with _without_address_env():
            return get_address_for_submission_client(address).rstrip("/")
    except Exception as e:  # Ray raises ConnectionError, ValueError or RuntimeError here depending on the address
        raise JobsError(f"cannot find the Ray dashboard for address {address!r} ({type(e).__name__}: {e}); "
                        "pass the dashboard URL instead, e.g. --address http://<head>:8265") from None


def is_local_cluster(conn: Connection) -> bool:
    """True when every node of the cluster is this machine, so a local folder is where the driver writes.

    The address alone cannot tell: http://127.0.0.1:8265 may be an SSH tunnel (`ray dashboard cluster.yaml`) to a
    head elsewhere, and a head here may have worker nodes elsewhere that a placed driver can land on.
    """
    import socket

    import requests

    try:
        r = requests.get(f"{conn.url}/nodes?view=summary", headers=conn.headers, timeout=10)
        nodes = r.json()["data"]["summary"]
        hostnames = {n.get("hostname") for n in nodes}
    except Exception:  # an older or trimmed dashboard: fall back to the address
        return is_local_address(conn.url)
    return bool(hostnames) and hostnames == {socket.gethostname()}


def is_local_address(url: str) -> bool:
    """True when the URL's host is this machine (loopback, or one of its own addresses)."""
    import ipaddress
    import socket
    from urllib.parse import urlparse

    host = urlparse(url).hostname or ""
    if host in ("localhost", ""):
        return True
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    if all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        return True
    try:
        mine = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        mine = set()
    return bool(addrs & mine)


def find_token() -> tuple[str, str] | None:
    """The token Ray itself would use and where it came from ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, default file)."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token, f"${TOKEN_ENV}"
    if os.environ.get(TOKEN_PATH_ENV):
        path = Path(os.environ[TOKEN_PATH_ENV]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise JobsError(f"${TOKEN_PATH_ENV} is {path}, which cannot be read ({e.strerror})") from None
        if not token:
            raise JobsError(f"${TOKEN_PATH_ENV} is {path}, which is empty")
        return token, f"${TOKEN_PATH_ENV} ({path})"
    path = DEFAULT_TOKEN_FILE.expanduser()
    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token, str(path)
    return None


def missing_token_message(url: str) -> str:
    return (f"the Ray cluster at {url} requires an authentication token (Ray token authentication) and none was "
            f"found here. Get it on the head node with `ray get-auth-token`, then either export {TOKEN_ENV}=<token>, "
            f"or save it to a file and export {TOKEN_PATH_ENV}=<file>, or save it as "
            f"{DEFAULT_TOKEN_FILE} on this machine")


def _auth_mode(url: str, timeout: float = 10.0) -> str:
    """What the cluster asks for ('token' or 'disabled'); the endpoint is public so this works before any token."""
    import requests

    try:
        r = requests.get(f"{url}/api/authentication_mode", timeout=timeout)
    except requests.exceptions.ConnectionError:
        raise JobsError(f"cannot reach a Ray cluster at {url}: nothing answers there. Start one with "
                        "`ray start --head --dashboard-host=127.0.0.1`, or pass the head's dashboard URL with "
                        f"--address (or $RAY_ADDRESS)") from None
    except requests.exceptions.Timeout:
        raise JobsError(f"the Ray dashboard at {url} did not answer within {timeout:g}s") from None
    except requests.exceptions.RequestException as e:
        raise JobsError(f"cannot talk to {url}: {e}") from None
    if r.status_code == 404:
        return "disabled"  # clusters from before token authentication existed
    try:
        return r.json().get("authentication_mode", "disabled")
    except ValueError:
        raise JobsError(f"{url} answered (HTTP {r.status_code}) but is not a Ray dashboard; "
                        "--address takes the dashboard URL, e.g. http://<head>:8265") from None


@dataclass
class Connection:
    url: str
    client: object        # ray.job_submission.JobSubmissionClient
    token_source: str | None
    headers: dict         # what every request carries (the token, when the cluster asks for one)

    @property
    def server_ray_version(self) -> str | None:
        return getattr(self.client, "_server_ray_version", None)


def connect(address: str | None) -> Connection:
    url = resolve_address(address or default_address())
    headers, source = {}, None
    if _auth_mode(url) == "token":
        found = find_token()
        if found is None:
            raise JobsError(missing_token_message(url))
        token, source = found
        headers["Authorization"] = f"Bearer {token}"
    from ray.job_submission import JobSubmissionClient

    with _without_address_env():
        client = call(lambda: JobSubmissionClient(url, headers=headers), url, source)
    return Connection(url, client, source, headers)


def call(fn, url: str, token_source: str | None, job_id: str | None = None):
    """Run one client request; every failure becomes a JobsError that names the cause."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        return fn()
    except AuthenticationError:
        if token_source:
            raise JobsError(f"the Ray cluster at {url} rejected the token from {token_source}; it belongs to another "
                            "cluster or is stale (on the head node, `ray get-auth-token` prints the right one)"
                            ) from None
        raise JobsError(missing_token_message(url)) from None
    except (requests.exceptions.ConnectionError, ConnectionError):
        raise JobsError(f"lost the connection to the Ray cluster at {url} (is the head still running?)") from None
    except requests.exceptions.RequestException as e:
        raise JobsError(f"request to {url} failed: {e}") from None
    except RuntimeError as e:
        text = str(e)
        if job_id is not None and ("404" in text or "does not exist" in text):
            raise JobsError(f"no job {job_id!r} on the cluster at {url} "
                            f"(`align jobs list --address {url}` shows its jobs)") from None
        raise JobsError(f"the Ray job server at {url} refused the request: {text}") from None


def job_info(conn: Connection, job_id: str):
    return call(lambda: conn.client.get_job_info(job_id), conn.url, conn.token_source, job_id)


def status_of(info) -> str:
    return getattr(info.status, "value", str(info.status))


def wait_terminal(conn: Connection, job_id: str, timeout: float | None = None, poll_s: float = 1.0):
    """Poll until the job ends; returns its JobInfo (possibly still running when ``timeout`` passed)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = job_info(conn, job_id)
        if status_of(info) in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return info
        time.sleep(poll_s)


def follow(conn: Connection, job_id: str, out=None) -> int:
    """Stream the job's logs until it ends; 0 if it SUCCEEDED, 1 if it FAILED or was STOPPED."""
    import asyncio

    out = out or sys.stdout

    async def tail():
        async for chunk in conn.client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    job_info(conn, job_id)  # an unknown id fails here with a clear message, not inside the websocket
    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nalign: stopped following {job_id}; it keeps running on the cluster "
              f"(`align jobs stop {job_id} --address {conn.url}` stops it)", file=sys.stderr)
        return 130
    except Exception as e:  # the stream can drop (network, head restart) while the job goes on
        print(f"align: log stream ended early ({type(e).__name__}: {e}); waiting for the job to finish",
              file=sys.stderr)
    # The stream closes when the driver exits; the job server records the final status a moment later.
    try:
        info = wait_terminal(conn, job_id)
    except KeyboardInterrupt:
        return 130
    return report_end(info, job_id)


def report_end(info, job_id: str) -> int:
    status = status_of(info)
    if status == "SUCCEEDED":
        print(f"align: job {job_id} SUCCEEDED", file=sys.stderr)
        return 0
    print(f"align: job {job_id} {status}" + (f": {headline(info)}" if headline(info) else ""), file=sys.stderr)
    if "exit code 127" in (info.message or ""):
        print("align: exit code 127 is the shell's `command not found`: the cluster's nodes have no `align` on the "
              "PATH Ray was started with; install the project there and start Ray from its environment "
              "(see ray_jobs/cluster.yaml)", file=sys.stderr)
    return 1


def headline(info) -> str:
    """The first line of a job's message: Ray appends the last 20,000 characters of the logs to failures."""
    message = (info.message or "").strip()
    first = message.splitlines()[0] if message else ""
    return first.split(", last available logs")[0]


# ---------------------------------------------------------------------------------------------------------------
# `align jobs ...`


def configure_parser(parser) -> None:
    parser.description = ("Inspect and control Ray Jobs on a running cluster (the ones `align submit` starts, and "
                          "any other job there).")
    sub = parser.add_subparsers(dest="action", required=True, metavar="action")
    p = sub.add_parser("list", help="all jobs on the cluster, oldest first")
    add_address_arg(p)
    p = sub.add_parser("status", help="status, recipe, output folder and timing of one job")
    p.add_argument("job_id")
    add_address_arg(p)
    p = sub.add_parser("logs", help="print a job's logs (stdout and stderr of its driver)")
    p.add_argument("job_id")
    p.add_argument("--follow", "-f", action="store_true",
                   help="stream until the job ends, then exit 0 if it SUCCEEDED, 1 otherwise")
    add_address_arg(p)
    p = sub.add_parser("stop", help="stop a job (SIGTERM to its driver, SIGKILL if it does not exit); "
                                    "its rollout actors go with it")
    p.add_argument("job_id")
    p.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                   help="wait this long for the job to reach STOPPED (0: do not wait)")
    add_address_arg(p)
    p = sub.add_parser("upload", help="copy an output folder to an fsspec URI (what jobs with a URI --storage run "
                                      "at their end; also useful to re-copy by hand)")
    p.add_argument("source", help="local folder")
    p.add_argument("dest", help="fsspec URI, e.g. s3://bucket/runs/<job>")
    p.add_argument("--check", action="store_true",
                   help="only check that DEST is writable (jobs run this before training)")
    p.add_argument("--keep", action="store_true", help="keep SOURCE after a successful copy")


def main(args) -> int:
    if args.action == "upload":
        from ray_jobs import storage

        if args.check:
            storage.check_writable(args.dest)
            print(f"align: {args.dest} is writable")
            return 0
        n = storage.upload(args.source, args.dest, remove_source=not args.keep)
        print(f"align: copied {n} files from {args.source} to {args.dest}")
        return 0
    conn = connect(args.address)
    if args.action == "list":
        return _list(conn)
    if args.action == "status":
        return _status(conn, args.job_id)
    if args.action == "logs":
        if args.follow:
            return follow(conn, args.job_id)
        job_info(conn, args.job_id)
        sys.stdout.write(call(lambda: conn.client.get_job_logs(args.job_id), conn.url, conn.token_source,
                              args.job_id))
        return 0
    if args.action == "stop":
        return _stop(conn, args.job_id, args.wait)
    raise AssertionError(args.action)


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _duration(start: int | None, end: int | None) -> str:
    if not start:
        return "-"
    seconds = int(((end or time.time() * 1000) - start) / 1000)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _list(conn: Connection) -> int:
    jobs = call(conn.client.list_jobs, conn.url, conn.token_source)
    jobs = [j for j in jobs if j.submission_id]  # drivers started by hand (`ray.init` on a node) are not jobs
    if not jobs:
        print(f"no jobs on {conn.url}")
        return 0
    rows = [("JOB ID", "STATUS", "STAGE", "STARTED", "DURATION", "OUTPUT")]
    for j in sorted(jobs, key=lambda j: j.start_time or 0):
        meta = j.metadata or {}
        rows.append((j.submission_id, status_of(j), meta.get("align_stage", "-"), _when(j.start_time),
                     _duration(j.start_time, j.end_time), meta.get("align_output", "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0


def _status(conn: Connection, job_id: str) -> int:
    info = job_info(conn, job_id)
    meta = info.metadata or {}
    lines = [
        ("job", job_id),
        ("status", status_of(info)),
        ("message", headline(info) or "-"),
        ("stage", meta.get("align_stage", "-")),
        ("recipe", meta.get("align_recipe", "-")),
        ("recipe sha256", meta.get("align_recipe_sha256", "-")),
        ("output", meta.get("align_output", "-")),
        ("started", _when(info.start_time)),
        ("ended", _when(info.end_time)),
        ("duration", _duration(info.start_time, info.end_time)),
        ("entrypoint", info.entrypoint),
    ]
    for key, value in lines:
        print(f"{key + ':':<15}{value}")
    return 0


def _stop(conn: Connection, job_id: str, wait: float) -> int:
    info = job_info(conn, job_id)
    if status_of(info) in TERMINAL:
        print(f"align: job {job_id} already ended ({status_of(info)}); nothing to stop")
        return 0
    call(lambda: conn.client.stop_job(job_id), conn.url, conn.token_source, job_id)
    if wait <= 0:
        print(f"align: stop requested for {job_id}")
        return 0
    info = wait_terminal(conn, job_id, timeout=wait)
    status = status_of(info)
    if status not in TERMINAL:
        print(f"align: stop requested, but {job_id} is still {status} after {wait:g}s; "
              f"check again with `align jobs status {job_id}`", file=sys.stderr)
        return 1
    print(f"align: job {job_id} {status}")
    return 0
