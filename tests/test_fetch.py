"""fetch against a local package index: unreachable index, checksum mismatch, and a good download."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from raymeta.assets import Package, download
from raymeta.cli import main


@pytest.fixture()
def local_index(tmp_path):
    """A PEP 503 index on loopback serving one project `demo` with one file."""
    root = tmp_path / "index"
    (root / "demo").mkdir(parents=True)
    (root / "files").mkdir()
    payload = b"real file content\n"
    (root / "files" / "demo-1.0.tar.gz").write_bytes(payload)
    (root / "demo" / "index.html").write_text(
        '<html><body><a href="../files/demo-1.0.tar.gz#sha256=x">demo-1.0.tar.gz</a></body></html>'
    )

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hashlib.sha256(payload).hexdigest()
    server.shutdown()


def test_download_verifies_and_is_idempotent(local_index, tmp_path, monkeypatch):
    url, digest = local_index
    monkeypatch.setenv("RAYMETA_INDEX_URL", url)
    pkg = Package("demo", "demo-1.0.tar.gz", digest)
    path = download(pkg, tmp_path / "dl", progress=False)
    assert path.read_bytes() == b"real file content\n"
    mtime = path.stat().st_mtime_ns
    assert download(pkg, tmp_path / "dl", progress=False) == path and path.stat().st_mtime_ns == mtime


def test_checksum_mismatch_is_refused_and_nothing_is_left(local_index, tmp_path, monkeypatch):
    from raymeta.errors import UserError

    url, _ = local_index
    monkeypatch.setenv("RAYMETA_INDEX_URL", url)
    with pytest.raises(UserError, match="does not match the pinned"):
        download(Package("demo", "demo-1.0.tar.gz", "0" * 64), tmp_path / "dl", progress=False)
    assert list((tmp_path / "dl").iterdir()) == []


def test_unreachable_index_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAYMETA_INDEX_URL", "http://127.0.0.1:9/simple")  # discard port: connection refused
    code = main(["fetch", "--quiet", "--home", str(tmp_path / "home")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("raymeta: error: cannot reach the package index at http://127.0.0.1:9/simple/")
    assert err.count("\n") == 1
    assert not Path(tmp_path / "home" / "models").exists()
