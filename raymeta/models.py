"""Loading a causal LM and its tokenizer: the built-in SmolLM2, any Hugging Face folder, or a checkpoint.

Loading is local only (`local_files_only=True`) and `trust_remote_code` stays off: raymeta never
fetches weights from a hub at run time and never runs code shipped with a model folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from raymeta.errors import UserError
from raymeta.paths import paths
from raymeta.storage import is_uri, stage

__all__ = ["BUILTIN", "resolve_model_dir", "load_model", "load_tokenizer"]

BUILTIN = "builtin"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_model_dir(spec: str, root: Path | None = None) -> Path:
    """`builtin` -> the fetched SmolLM2 folder; a folder with config.json; or a checkpoint folder
    holding a `model/` subfolder, local or on object storage (`s3://.../checkpoints/step-N`)."""
    if spec == BUILTIN:
        folder = paths(root).smollm2
        if not (folder / "config.json").is_file():
            raise UserError(f"builtin: SmolLM2 is not fetched yet ({folder}); run `raymeta fetch` first", key="model")
        return folder
    folder = stage(spec) if is_uri(spec) else Path(spec).expanduser()  # on object storage: a local copy
    if not folder.is_dir():
        raise UserError(f"{spec}: folder not found (expected 'builtin' or a Hugging Face model folder)", key="model")
    for candidate in (folder, folder / "model"):
        if (candidate / "config.json").is_file():
            return candidate
    raise UserError(f"{spec}: not a Hugging Face model folder (no config.json in it or in its model/ subfolder)", key="model")


def load_model(
    spec: str,
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    root: Path | None = None,
) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM  # deferred: transformers loads only to load a model

    if dtype not in _DTYPES:
        raise UserError(f"expected one of {', '.join(_DTYPES)}, got {dtype!r}", key="dtype")
    folder = resolve_model_dir(spec, root)
    kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype], "local_files_only": True, "trust_remote_code": False}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{spec}: cannot load a causal LM from {folder} ({first})", key="model") from None
    return model.to(device).eval()


def load_tokenizer(spec: str, root: Path | None = None) -> Any:
    from transformers import AutoTokenizer  # deferred, as above

    folder = resolve_model_dir(spec, root)
    for candidate in (folder, folder.parent):
        if (candidate / "tokenizer.json").is_file() or (candidate / "vocab.json").is_file():
            try:
                return AutoTokenizer.from_pretrained(candidate, local_files_only=True, trust_remote_code=False)
            except (OSError, ValueError) as e:
                raise UserError(f"{spec}: cannot load the tokenizer in {candidate} ({e})", key="model") from None
    raise UserError(f"{spec}: no tokenizer files (tokenizer.json or vocab.json) in {folder}", key="model")
