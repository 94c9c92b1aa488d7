"""The maths, in pure PyTorch: no Ray, no files, no command line.

- `lm`:    `Batch`, `FunctionalLM` (a causal LM as a function of its weights) and MetaICL's loss.
- `optim`: differentiable SGD, Adam and AdamW (the reference formula and the accelerated node).
- `meta`:  `MetaConfig`, `task_meta_gradient`, `Accumulator`, `MetaLearner`.
"""
