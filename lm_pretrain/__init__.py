"""lmp: pretrain small language models from a YAML recipe."""

__version__ = "0.1.0"
