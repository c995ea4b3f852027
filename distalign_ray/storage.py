"""Shared storage: where everything lives that a process on another node reads (adapters, merged
models, Ray Train/Tune runs, sample tables).

The storage root is `DISTALIGN_STORAGE` (or `storage:` in a config, or `--storage`): a folder every
node mounts (NFS) or a pyarrow filesystem URI (`s3://bucket/prefix`, `gs://...`), as Ray Train
accepts for `storage_path`. Unset, it is the project folder: one machine, nothing to configure, and
nothing is copied. Folders are written under a temporary name and renamed (folders) or completed by
a marker file written last (URIs), so a reader never sees half a folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from distalign_ray.errors import DistalignError
from distalign_ray.paths import cache_dir, home_dir

STORAGE_ENV = "DISTALIGN_STORAGE"
COMPLETE_MARKER = ".distalign-complete"


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def normalize(location: str | os.PathLike) -> str:
    """URIs as given (without a trailing slash); paths absolute."""
    text = str(location)
    return text.rstrip("/") if is_uri(text) else str(Path(text).expanduser().absolute())


def shared_storage_configured() -> bool:
    return bool(os.environ.get(STORAGE_ENV))


def storage_root() -> str:
    """The storage root every node can read: DISTALIGN_STORAGE, else the project folder."""
    value = os.environ.get(STORAGE_ENV)
    return normalize(value) if value else str(home_dir())


def use_storage(location: str) -> str:
    """Make `location` the storage root of this process (and of the Ray jobs it starts), after
    checking it can be written: one clear error instead of a failure on a worker."""
    location = normalize(location)
    probe = join(location, f".distalign-probe-{uuid.uuid4().hex[:8]}")
    try:
        fs, path = filesystem(probe)
        fs.create_dir(path, recursive=True)
        fs.delete_dir(path)
    except DistalignError:
        raise
    except Exception as exc:  # noqa: BLE001 - permissions, missing bucket, credentials...
        raise DistalignError(f"storage {location} is not writable: {str(exc).splitlines()[0]}") from None
    os.environ[STORAGE_ENV] = location
    return location


def join(root: str, *parts: str) -> str:
    if is_uri(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(root, *parts))


def filesystem(location: str):
    """(pyarrow filesystem, path inside it) for a URI or a local path."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), normalize(location)
    try:
        return pafs.FileSystem.from_uri(location)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad or unsupported URIs
        raise DistalignError(f"storage location {location} cannot be opened: {str(exc).splitlines()[0]}") from None


def exists(location: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(location: str) -> str:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as handle:
        return handle.read().decode("utf-8")


def write_text(location: str, text: str) -> None:
    """Write a small text file whole: under a temporary name and renamed (a folder), or in one stream (a URI)."""
    if not is_uri(location):
        target = Path(location)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
        staging.write_text(text)
        os.replace(staging, target)
        return
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as handle:
        handle.write(text.encode("utf-8"))


def remove_folder(location: str) -> None:
    """Delete a folder and its contents, if it exists."""
    if exists(location):
        fs, path = filesystem(location)
        fs.delete_dir(path)


def is_complete_folder(location: str) -> bool:
    """A folder written by `write_folder` (local folders appear whole by renaming)."""
    if not is_uri(location):
        return Path(location).is_dir()
    return exists(join(location, COMPLETE_MARKER))


def folder_is_empty_or_absent(location: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return True
    if info.type != pafs.FileType.Directory:
        return False
    return not fs.get_file_info(pafs.FileSelector(path, recursive=False))


def write_folder(local: Path, location: str) -> None:
    """Copy the local folder `local` to `location` (absent or an empty folder): whole or not at all."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        target = Path(location)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(local, staging)
            if target.is_dir():
                target.rmdir()  # empty, checked by the caller
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    with fs.open_output_stream(join(path, COMPLETE_MARKER)):
        pass  # written last: readers wait for it


def build_atomically(target: Path, build: Callable[[Path], None], is_done: Callable[[Path], bool]) -> None:
    """Run `build(tmp_folder)` and rename the result to `target`, under a file lock: concurrent
    callers on one node build it once and never see a half-written folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if is_done(target):
            return
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            build(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def local_folder(location: str) -> Path:
    """The folder at `location` as a path on this node: the path itself where this node sees it
    (a local or shared mount), else a copy in this node's cache, downloaded once."""
    if not is_uri(location):
        path = Path(location)
        if path.is_dir():
            return path
        raise DistalignError(
            f"{location} is not visible on node {socket.gethostname()}: keep what workers read on shared "
            f"storage ({STORAGE_ENV}: a folder every node mounts, or a bucket URI)"
        )
    import pyarrow.fs as pafs

    target = cache_dir() / "storage" / hashlib.sha256(location.encode()).hexdigest()[:16]

    def download(tmp: Path) -> None:
        if not is_complete_folder(location):
            raise DistalignError(f"{location} is missing or incomplete in storage")
        fs, path = filesystem(location)
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())

    build_atomically(target, download, is_done=Path.is_dir)
    return target


def folder_digest(folder: Path) -> str:
    """Content hash of a folder (file names and bytes)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def shared_root() -> str | None:
    """The configured shared storage root, or None on one machine (nothing needs copying there)."""
    return storage_root() if shared_storage_configured() else None


def publish_folder(location: str | os.PathLike, kind: str, root: str | None = None) -> str:
    """Where workers on any node can read the folder at `location`: the location itself when it is
    a URI, lies under the shared root, or there is no shared root (one machine); else a copy under
    `<root>/<kind>/<name>-<content hash>`, made once. `root` defaults to this process's shared root
    (Ray workers get it passed: they do not inherit the driver's settings)."""
    location = normalize(location)
    root = root or shared_root()
    if root is None or is_uri(location) or (not is_uri(root) and Path(root) in Path(location).parents):
        return location
    source = Path(location)
    if not source.is_dir():
        raise DistalignError(f"{location} is not a folder")
    target = join(root, kind, f"{source.name}-{folder_digest(source)}")
    if not is_complete_folder(target):
        try:
            write_folder(source, target)
        except OSError:
            if not is_complete_folder(target):  # else: another process published the same content first
                raise
    return target
