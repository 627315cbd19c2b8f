"""Where a job's outputs go: a folder every node sees at the same path, or an fsspec URI.

A folder (NFS, EFS, Lustre, or this machine's disk for a cluster on this machine) is the stage's ``output_dir``
itself, so the lock file, checkpoints and metrics land there as they are written.  For a URI (``s3://``,
``gs://``, ``az://``, ... or ``file://``) the stage writes to a folder on the driver's node and the job copies the
finished folder with fsspec at the end, whatever the exit status, so a failed run's checkpoints are kept too.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

# Where a URI-storage job writes before the copy: outside Ray's per-session folders, which Ray may delete.
STAGING_ROOT = "/tmp/align-jobs"


@dataclass
class Storage:
    root: str          # absolute folder, or a URI without trailing slash
    is_uri: bool

    def output_for(self, name: str) -> str:
        """Where the finished run of job ``name`` will be."""
        return f"{self.root}/{name}"

    def stage_output_dir(self, name: str) -> str:
        """The stage's ``output_dir``: the output itself for a folder, a staging folder for a URI."""
        return f"{STAGING_ROOT}/{name}" if self.is_uri else self.output_for(name)


def is_uri(text: str) -> bool:
    return "://" in text


def resolve(storage: str) -> Storage:
    if is_uri(storage):
        return Storage(storage.rstrip("/"), True)
    return Storage(str(Path(storage).expanduser().resolve()), False)


def _fs(uri: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        protocol = uri.split("://", 1)[0]
        raise OSError(f"cannot open {uri}: {e} (the fsspec backend for {protocol}:// must be installed where the "
                      "job runs, e.g. s3fs for s3://, gcsfs for gs://, adlfs for az://)") from None


def check_writable(uri: str) -> None:
    """Fail now, before hours of training, if the copy at the end could not happen."""
    fs, root = _fs(uri)
    probe = f"{root.rstrip('/')}/.align-write-check-{uuid.uuid4().hex[:8]}"
    try:
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as e:  # backends raise their own error types (botocore, google.api_core, ...)
        raise OSError(f"cannot write to {uri}: {type(e).__name__}: {e}") from None


def upload(source: str | Path, dest: str, remove_source: bool = True) -> int:
    """Copy every file under ``source`` to ``dest`` (file by file, so no backend's directory rules apply)."""
    source = Path(source)
    if not source.is_dir():
        raise OSError(f"{source}: no such folder to copy (did the stage start at all?)")
    fs, root = _fs(dest)
    root = root.rstrip("/")
    n = 0
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = path.relative_to(source).as_posix()
        target = f"{root}/{rel}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(path), target)
        n += 1
    if remove_source:
        shutil.rmtree(source)
    return n

