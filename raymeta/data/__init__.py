"""Data: MetaICL's layout, the BIG-bench builder, prompts (MetaICL's tensorization) and the meta-batch sampler."""

from raymeta.data.layout import DEFAULT_SEEDS, DataDir, Example, Setting, open_data, read_examples

__all__ = ["DEFAULT_SEEDS", "DataDir", "Example", "Setting", "open_data", "read_examples"]
