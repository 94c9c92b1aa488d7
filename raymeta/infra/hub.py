"""Hugging Face hub ids as models: `model=ORG/NAME` or `ORG/NAME@REVISION` (a branch, tag or commit).

Resolved with `huggingface_hub.snapshot_download` into the hub's own cache ($HF_HUB_CACHE, $HF_HOME),
which every later run reads without the network; offline mode ($HF_HUB_OFFLINE=1) is honoured: only
the cache is read. Only safetensors weights, configs and tokenizer files are fetched (no pickled
`*.bin`), and nothing shipped as code runs (`trust_remote_code` stays off). Pin a commit
(`ORG/NAME@<40 hex>`) for a run that cannot change under you.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from raymeta.errors import UserError

__all__ = ["HUB_FILES", "is_hub_id", "snapshot"]

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}(@[A-Za-z0-9._/-]{1,200})?")
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]


def is_hub_id(spec: str) -> bool:
    """Whether `spec` reads as ORG/NAME[@REVISION] (callers try a local folder first)."""
    return bool(_ID.fullmatch(spec)) and not spec.startswith((".", "/", "~"))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def snapshot(spec: str) -> Path:
    """The local snapshot folder of hub id `spec` (downloaded unless offline); one line on any failure."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, _, revision = spec.partition("@")
    offline = _offline()
    try:
        folder = Path(snapshot_download(repo, revision=revision or None, allow_patterns=HUB_FILES, local_files_only=offline))
    except LocalEntryNotFoundError:
        where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
        if offline:
            hint = f"offline (HF_HUB_OFFLINE=1), and {spec} is not in {where}; download it once: hf download {repo}"
        else:
            hint = f"not in {where} and the hub cannot be reached"
        raise UserError(f"{spec}: not a local folder; as a hub id: {hint}", key="model") from None
    except RevisionNotFoundError:
        raise UserError(f"{spec}: the hub repository has no revision {revision!r}", key="model") from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{spec}: not a local folder, and no such hub repository (or it is private: hf auth login)", key="model"
        ) from None
    except (HFValidationError, HfHubHTTPError, OSError) as e:
        raise UserError(f"{spec}: cannot fetch it from the hub ({str(e).splitlines()[0][:200]})", key="model") from None
    if not (folder / "config.json").is_file():
        raise UserError(f"{spec}: the hub snapshot {folder} has no config.json (not a transformers model)", key="model")
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"{spec}: the hub repository has no safetensors weights (raymeta loads no pickled *.bin)", key="model")
    return folder
