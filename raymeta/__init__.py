"""raymeta: meta-training causal language models for in-context learning, on Ray.

The public API (loaded on first use, so that `import raymeta` and the command line stay fast):

    import raymeta

    cfg = raymeta.load_config("configs/tiny.yaml", ["steps=4"])    # a TrainConfig
    final = raymeta.train(cfg)                                      # meta-train; the final checkpoint
    results = raymeta.evaluate(str(final), k=4, variants=("direct",), modes=("icl",), max_test_examples=10)

    # or, on your own model and batches (any Hugging Face causal LM):
    learner = raymeta.MetaLearner(model, raymeta.MetaConfig(method="maml_en_llm"))
    learner.step([raymeta.TaskBatch("task", support_batch, query_batch)])

`task_meta_gradient` is one task's meta-gradient as a pure function (what each Ray task computes).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = {
    "Batch": "raymeta.core.lm",
    "FunctionalLM": "raymeta.core.lm",
    "MetaConfig": "raymeta.core.meta",
    "MetaLearner": "raymeta.core.meta",
    "TaskBatch": "raymeta.core.meta",
    "task_meta_gradient": "raymeta.core.meta",
    "TrainConfig": "raymeta.config",
    "load_config": "raymeta.config",
    "EvalConfig": "raymeta.eval.icl",
    "AdaptConfig": "raymeta.eval.adapt",
    "adaptation_as_trained": "raymeta.run.api",
    "UserError": "raymeta.errors",
    "train": "raymeta.run.api",
    "evaluate": "raymeta.run.api",
}

__all__ = [
    "AdaptConfig",
    "Batch",
    "EvalConfig",
    "FunctionalLM",
    "MetaConfig",
    "MetaLearner",
    "TaskBatch",
    "TrainConfig",
    "UserError",
    "__version__",
    "adaptation_as_trained",
    "evaluate",
    "load_config",
    "task_meta_gradient",
    "train",
]

if TYPE_CHECKING:
    from raymeta.config import TrainConfig, load_config
    from raymeta.core.lm import Batch, FunctionalLM
    from raymeta.core.meta import MetaConfig, MetaLearner, TaskBatch, task_meta_gradient
    from raymeta.errors import UserError
    from raymeta.eval.adapt import AdaptConfig
    from raymeta.eval.icl import EvalConfig
    from raymeta.run.api import adaptation_as_trained, evaluate, train


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'raymeta' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
