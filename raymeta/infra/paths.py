"""Where raymeta keeps its cache: downloads, the converted SmolLM2, the GPT-2 tokenizer, the built-in data.

A leaf module (no raymeta imports) so that the asset fetcher, the data readers and the model loader
agree on the folders without importing each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Paths", "home", "paths"]


def home() -> Path:
    """raymeta's cache folder: $RAYMETA_HOME, else $XDG_CACHE_HOME/raymeta, else ~/.cache/raymeta."""
    env = os.environ.get("RAYMETA_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "raymeta"


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def smollm2(self) -> Path:
        return self.root / "models" / "smollm2-135m-instruct"

    @property
    def gpt2_tokenizer(self) -> Path:
        return self.root / "tokenizers" / "gpt2"

    @property
    def builtin_data(self) -> Path:
        """The built-in settings (mix_to_mix, class_to_class, qa_to_qa)."""
        return self.root / "data" / "builtin"

    @property
    def bigbench_data(self) -> Path:
        """The bb_* settings, built by `raymeta fetch --bigbench PATH` from a tarball the user holds."""
        return self.root / "data" / "bigbench"

    @property
    def loss_cache(self) -> Path:
        return self.root / "cache" / "losses"


def paths(root: Path | None = None) -> Paths:
    return Paths(root or home())
