"""Run folders on a local file system or on object storage (`s3://`, `gs://`, ...), through pyarrow.

A run folder (`out`) is a local path or a URI that `pyarrow.fs.FileSystem.from_uri` opens, the same
convention as Ray Train's `storage_path`. Credentials and endpoints come from the standard
environment (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION),
never from raymeta's config.

- Local folders keep their atomic writes (temporary name, then rename).
- On object storage a write puts the whole object, which readers see complete or not at all; a
  checkpoint is uploaded file by file with its `state.json` last, and only a checkpoint that has its
  `state.json` counts, so a half-uploaded checkpoint is never resumed from.
- Checkpoints on object storage are read through a local copy (`stage`), which `from_pretrained`
  and the resume path load as any folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs

from raymeta.errors import UserError, first_line
from raymeta.infra.io import atomic_dir, atomic_write_bytes, atomic_write_text
from raymeta.infra.paths import paths

__all__ = ["RunStore", "is_uri", "stage"]

_LAST = ("state.json", "manifest.json")  # a checkpoint's last files, in this order (see raymeta.run.checkpoint)


def is_uri(location: str | os.PathLike[str]) -> bool:
    """Whether `location` names object storage (`scheme://...`) rather than a local path."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def _open(uri: str, key: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as e:
        raise UserError(f"{uri}: cannot open this storage ({first_line(e)})", key=key) from None


class RunStore:
    """One run folder: `out` as the user gave it (a path or a URI) and the file system behind it."""

    def __init__(self, location: str | os.PathLike[str], key: str = "out") -> None:
        self.location = str(location)
        self.key = key
        self.remote = is_uri(location)
        if self.remote:
            self.fs, self.root = _open(self.location, key)
            self.local: Path | None = None
        else:
            self.local = Path(location).expanduser().resolve()
            self.fs, self.root = pafs.LocalFileSystem(), str(self.local)

    def __str__(self) -> str:
        return self.location

    def uri(self, rel: str = "") -> str:
        """The location of `rel` inside the run folder: a URI as the user wrote it, or an absolute local path
        (Ray Train's `storage_path` refuses a relative one: "URI has empty scheme")."""
        if self.remote:
            return f"{self.location.rstrip('/')}/{rel}" if rel else self.location
        return str(self.local / rel) if rel else str(self.local)  # type: ignore[operator]

    def _path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    # --- checks ----------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Write and delete a probe object: unreachable or read-only storage is one line, before any work."""
        if not self.remote:
            assert self.local is not None
            if self.local.exists() and not self.local.is_dir():
                raise UserError(f"{self.location}: exists and is not a folder", key=self.key)
            return
        probe = f".raymeta-probe-{os.getpid()}"
        try:
            with self.fs.open_output_stream(self._path(probe)) as f:
                f.write(b"raymeta")
            self.fs.delete_file(self._path(probe))
        except OSError as e:
            raise UserError(f"{self.location}: cannot write to this storage ({first_line(e)})", key=self.key) from None

    # --- files -------------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._path(rel)) as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.local is not None:
            atomic_write_bytes(self.local / rel, data)
            return
        with self.fs.open_output_stream(self._path(rel)) as f:
            f.write(data)

    def read_text(self, rel: str) -> str:
        if self.local is not None:
            return (self.local / rel).read_text(encoding="utf-8")
        with self.fs.open_input_stream(self._path(rel)) as f:
            return f.read().decode("utf-8")

    def append_line(self, rel: str, line: str, everything: str) -> None:
        """Add `line` to a text file whose whole new content is `everything` (object storage rewrites it)."""
        if self.local is not None:
            with (self.local / rel).open("a", encoding="utf-8") as f:
                f.write(line)
        else:
            self.write_text(rel, everything)

    def write_text(self, rel: str, text: str) -> None:
        if self.local is not None:
            atomic_write_text(self.local / rel, text)
            return
        with self.fs.open_output_stream(self._path(rel)) as f:
            f.write(text.encode("utf-8"))

    def subdirs(self, rel: str) -> list[str]:
        """Names of the folders directly under `rel` (empty when `rel` does not exist)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self._path(rel), allow_not_found=True))
        except OSError as e:
            raise UserError(f"{self.uri(rel)}: cannot list ({first_line(e)})", key=self.key) from None
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def delete_dir(self, rel: str) -> None:
        if self.local is not None:
            shutil.rmtree(self.local / rel, ignore_errors=True)
        else:
            self.fs.delete_dir(self._path(rel))

    # --- folders -----------------------------------------------------------------------------------
    def put_dir(self, rel: str, write: Callable[[Path], None]) -> None:
        """Build a folder with `write(tmp_folder)` and store it at `rel`: renamed into place locally,
        uploaded file by file (`state.json` last) on object storage."""
        if self.local is not None:
            with atomic_dir(self.local / rel) as tmp:
                write(tmp)
            return
        with tempfile.TemporaryDirectory(prefix="raymeta-upload-") as tmp:
            write(Path(tmp))
            self.upload(Path(tmp), rel)

    def upload(self, folder: Path, rel: str) -> None:
        def order(p: Path) -> tuple[int, str]:
            return (_LAST.index(p.name) + 1 if p.name in _LAST else 0, str(p))

        files = sorted((p for p in folder.rglob("*") if p.is_file()), key=order)
        for file in files:
            target = self._path(f"{rel}/{file.relative_to(folder).as_posix()}")
            with file.open("rb") as src, self.fs.open_output_stream(target) as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)

    def listing(self, rel: str) -> str:
        """The files under `rel` with their sizes and modification times, one per line (a version tag)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self._path(rel), recursive=True))
        rows = sorted(f"{i.path}\t{i.size}\t{i.mtime_ns}" for i in infos if i.type == pafs.FileType.File)
        return "\n".join(rows) + "\n"

    def download(self, rel: str, folder: Path) -> None:
        infos = self.fs.get_file_info(pafs.FileSelector(self._path(rel), recursive=True))
        base = self._path(rel).rstrip("/") + "/"
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            target = folder / info.path[len(base) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(info.path) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)


def stage(uri: str, key: str = "model") -> Path:
    """A local copy of a folder on object storage (a checkpoint, a model), cached under raymeta's home
    by URI and by a listing of the remote files (paths, sizes, modification times): an object store
    that now holds something else at that URI is downloaded again."""
    base, _, rel = uri.rstrip("/").rpartition("/")
    store = RunStore(base, key=key)
    if not store.exists(rel):
        raise UserError(f"{uri}: not found", key=key)
    folder = paths().root / "staged" / hashlib.sha256(uri.encode()).hexdigest()[:16] / rel
    listing = store.listing(rel)
    marker = folder / ".complete"
    if not marker.is_file() or marker.read_text(encoding="utf-8", errors="replace") != listing:
        with atomic_dir(folder) as tmp:
            store.download(rel, tmp)
            (tmp / ".complete").write_text(listing)
    return folder
