"""Running meta-training: the loop, checkpoints, held-out validation, the executor of the per-task
adaptations (in process or as Ray tasks) and Ray Train placement. `api` holds `train` and `evaluate`."""
