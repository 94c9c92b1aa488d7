"""The model: loading causal LMs and raymeta checkpoints (`load`), and which weights are meta-trained
(`weights`: full, a subset, or LoRA through PEFT). Nothing is imported here."""
