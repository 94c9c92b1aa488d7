"""Loading a causal LM and its tokenizer: the built-in SmolLM2, any Hugging Face folder, a hub id
(`ORG/NAME[@REVISION]`, see `raymeta.infra.hub`), a checkpoint, or a PEFT adapter folder (a LoRA checkpoint)
on the base model it names.

Loading reads local folders only (`local_files_only=True`) and `trust_remote_code` stays off: a hub id
is first resolved to its snapshot in the hub's cache (safetensors only), and raymeta never runs code
shipped with a model folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from raymeta.core.lm import hf_model
from raymeta.errors import UserError, first_line
from raymeta.infra.hub import is_hub_id, snapshot
from raymeta.infra.paths import paths
from raymeta.infra.storage import is_uri, stage
from raymeta.model.weights import BASE_FILE, WeightsConfig, is_adapter_folder, load_adapter, prepare, restrict

__all__ = ["BUILTIN", "adapter_base", "check_weights", "load_model", "load_tokenizer", "load_trainable", "resolve_model_dir"]

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
    holding a `model/` subfolder, local or on object storage (`s3://.../checkpoints/step-N`); a PEFT
    adapter folder (adapter_config.json) counts too."""
    if spec == BUILTIN:
        folder = paths(root).smollm2
        if not (folder / "config.json").is_file():
            raise UserError(f"builtin: SmolLM2 is not fetched yet ({folder}); run `raymeta fetch` first", key="model")
        return folder
    folder = stage(spec) if is_uri(spec) else Path(spec).expanduser()  # on object storage: a local copy
    if not folder.is_dir() and is_hub_id(spec):
        folder = snapshot(spec)  # ORG/NAME[@REVISION]: the hub's cache (offline mode honoured)
    if not folder.is_dir():
        raise UserError(f"{spec}: folder not found (expected 'builtin', a Hugging Face model folder or hub id)", key="model")
    for candidate in (folder, folder / "model"):
        if (candidate / "config.json").is_file() or is_adapter_folder(candidate):
            return candidate
    raise UserError(
        f"{spec}: not a Hugging Face model folder (no config.json or adapter_config.json in it or in its model/ subfolder)",
        key="model",
    )


def adapter_base(folder: Path) -> str:
    """The base model an adapter folder names: raymeta's record, else PEFT's base_model_name_or_path."""
    record = folder / BASE_FILE
    if record.is_file():
        return str(json.loads(record.read_text())["base_model"])
    name = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not name:
        raise UserError(f"{folder}: the adapter names no base model; pass one", key="base_model")
    return str(name)


def quiet_libraries() -> None:
    """Transformers' info logs and progress bars off, tokenizers' thread pool off (we fork and use Ray)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging  # deferred, as below

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(
    spec: str,
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    root: Path | None = None,
    base_model: str | None = None,
    merge: bool = False,
    trainable: bool = False,
) -> torch.nn.Module:
    """A model in eval mode on `device`. An adapter folder loads on its base (`base_model`, default the
    one it names; a different base is refused): merged into it with `merge`, as the PeftModel (adapter
    trainable) with `trainable`, else as the Hugging Face model with its LoRA layers in place."""
    from transformers import AutoModelForCausalLM  # deferred: transformers loads only to load a model

    quiet_libraries()  # here too: Ray workers and tasks load models without the CLI's set-up
    if dtype not in _DTYPES:
        raise UserError(f"expected one of {', '.join(_DTYPES)}, got {dtype!r}", key="dtype")
    folder = resolve_model_dir(spec, root)
    if is_adapter_folder(folder):
        base_spec = base_model or adapter_base(folder)
        base = load_model(base_spec, dtype=dtype, device=device, attn_implementation=attn_implementation, root=root)
        # what adaptation evaluation (`--adapt-steps`) adapts: the adapters, or every weight once merged
        adapted = load_adapter(base, folder, base_spec=base_spec, trainable=not merge, merge=merge)
        if merge:
            for p in adapted.parameters():
                p.requires_grad_(True)
        return (adapted if trainable or merge else hf_model(adapted)).to(device).eval()
    kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype], "local_files_only": True, "trust_remote_code": False}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except Exception as e:  # noqa: BLE001 - whatever the file is (truncated safetensors, a refused pickle), one line
        raise UserError(
            f"{spec}: cannot load a causal LM from {folder} ({first_line(e, limit=200, with_type=True)})", key="model"
        ) from None
    return model.to(device).eval()


def load_tokenizer(spec: str, root: Path | None = None) -> Any:
    from transformers import AutoTokenizer  # deferred, as above

    folder = resolve_model_dir(spec, root)
    for candidate in (folder, folder.parent):
        if (candidate / "tokenizer.json").is_file() or (candidate / "vocab.json").is_file():
            try:
                return AutoTokenizer.from_pretrained(candidate, local_files_only=True, trust_remote_code=False)
            except Exception as e:  # noqa: BLE001 - a garbage tokenizer file raises whatever its parser raises
                raise UserError(
                    f"{spec}: cannot load the tokenizer in {candidate} ({first_line(e, limit=200, with_type=True)})", key="model"
                ) from None
    if is_adapter_folder(folder):  # a bare PEFT adapter: its base model's tokenizer
        return load_tokenizer(adapter_base(folder), root)
    raise UserError(f"{spec}: no tokenizer files (tokenizer.json or vocab.json) in {folder}", key="model")


def load_trainable(
    spec: str,
    weights: WeightsConfig,
    *,
    resume: Path | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    root: Path | None = None,
) -> torch.nn.Module:
    """The model meta-training starts from, its trainable weights set (`weights`): the model `spec`, or a
    checkpoint of the run (`resume`; an adapter checkpoint loads on `spec` as its base)."""
    if resume is not None and is_adapter_folder(resolve_model_dir(str(resume), root)):
        model = load_model(str(resume), device=device, root=root, base_model=spec, trainable=True)
        restrict(model, weights.trainable)
        return model
    model = load_model(str(resume) if resume is not None else spec, device=device, root=root)
    return prepare(model, weights, seed=seed)


def check_weights(spec: str, weights: WeightsConfig, root: Path | None = None) -> None:
    """Pre-flight: `trainable` and `adapter.*` fit the model's parameter names (built on the meta
    device: no weights are read)."""
    if weights.trainable is None and weights.adapter.type == "none":
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = resolve_model_dir(spec, root)
    if is_adapter_folder(folder):
        return
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{spec}: cannot read its config ({str(e).splitlines()[0]})", key="model") from None
    prepare(model, weights)
