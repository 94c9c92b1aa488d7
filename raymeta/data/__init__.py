"""Data: MetaICL's layout, validation, and the BIG-bench builder."""

from raymeta.data.layout import DEFAULT_SEEDS, DataDir, Example, Setting, open_data, read_examples

__all__ = ["DEFAULT_SEEDS", "DataDir", "Example", "Setting", "open_data", "read_examples"]
