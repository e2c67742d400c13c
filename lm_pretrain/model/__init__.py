"""The decoder model (decoder.py) and its transformers-loadable export (export.py)."""
