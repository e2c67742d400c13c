"""Data: read a corpus, split it, train or load a tokenizer, and cache token shards on disk.

`prepare.prepare_data(recipe)` is the entry point that `lmp data prepare` and `lmp train` call.
"""
