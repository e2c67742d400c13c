"""Token shards on disk: one flat token file per split, plus document offsets and sources.

Layout of a shard folder, per split name (e.g. "train", "val"):

    <name>.tokens.bin   all token ids back to back, uint16 when the vocabulary fits, else uint32
    <name>.docs.npy     int64 start offset of every document, plus the end (n_docs + 1 entries)
    <name>.sources.npy  int32 index into meta.json's "sources" for every document
    <name>.prefix.npy   (splits with metadata prefixes only) int32 prefix tokens per document
    meta.json           dtype, counts, source names, unigram entropy, byte size and blake2b of
                        every file, and "complete": true. It is written last and atomically,
                        so a folder without it (or with "complete" false) was never finished.

A document is stored as its tokenizer encoding (which starts with BOS) followed by EOS; with a
metadata prefix, as BOS + prefix tokens + text tokens + EOS, the prefix encoded on its own so the
boundary is exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tokenizers import Tokenizer

from lm_pretrain.data.corpus import Document
from lm_pretrain.errors import LmpError

FORMAT_VERSION = 1
META = "meta.json"
_HASH_CHUNK = 8 << 20
_BATCH_CHARS = 4 << 20  # text per encode_batch call: big enough to keep the Rust threads busy
_BATCH_DOCS = 4096


@dataclass
class TokenShard:
    tokens: np.ndarray  # np.memmap of the token file (a plain empty array for an empty split)
    doc_offsets: np.ndarray
    doc_sources: np.ndarray
    sources: list[str]
    prefix_lengths: np.ndarray | None = None  # tokens after each document's BOS that carry no loss

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_docs(self) -> int:
        return int(self.doc_offsets.shape[0]) - 1


def shard_files(name: str) -> tuple[str, str, str]:
    return f"{name}.tokens.bin", f"{name}.docs.npy", f"{name}.sources.npy"


def file_digest(path: Path) -> str:
    """blake2b of a file, read in 8 MiB chunks so big shards never sit in memory."""
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write to a temp name, fsync, then rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _batches(docs: list[Document]):
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _entropy(counts: np.ndarray) -> float:
    """Shannon entropy in nats of the distribution given by counts (0 for no tokens)."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def build_shards(
    splits: dict[str, list[Document]],
    tok: Tokenizer,
    out_dir: Path,
    *,
    bos_id: int,
    eos_id: int,
    show_progress: bool = True,
    console: Console | None = None,
) -> dict:
    """Tokenize every split into `out_dir` and write meta.json last. Returns the meta dict.

    Tokens go to disk batch by batch, so memory holds one batch of tokens, not the corpus."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = tok.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    sources = sorted({doc.source for docs in splits.values() for doc in docs})
    source_id = {s: i for i, s in enumerate(sources)}
    meta: dict = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "bos_id": bos_id,
        "eos_id": eos_id,
        "sources": sources,
        "splits": {},
    }
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TextColumn("docs {task.fields[tokens]:,} tokens {task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not show_progress,
    )
    with progress:
        for name, docs in splits.items():
            meta["splits"][name] = _write_split(
                name, docs, tok, out_dir, dtype, source_id, bos_id, eos_id, progress
            )
    meta["complete"] = True  # last key, and the file is written last
    write_json_atomic(out_dir / META, meta)
    return meta


def _write_split(name, docs, tok, out_dir, dtype, source_id, bos_id, eos_id, progress) -> dict:
    bin_name, docs_name, sources_name = shard_files(name)
    task = progress.add_task(f"tokenizing {name}", total=len(docs), tokens=0, rate="")
    lengths: list[np.ndarray] = []
    counts = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    n_tokens = 0
    with_prefix = any(doc.prefix for doc in docs)
    prefix_lengths: list[int] = []
    start = time.perf_counter()
    with open(out_dir / bin_name, "wb") as f:
        for batch in _batches(docs):
            encodings = tok.encode_batch([doc.text for doc in batch])
            prefixes = [[] for _ in batch]
            if with_prefix:
                prefixes = [
                    e.ids for e in tok.encode_batch([d.prefix for d in batch], add_special_tokens=False)
                ]
                prefix_lengths.extend(len(p) for p in prefixes)
            pieces = []
            for enc, prefix in zip(encodings, prefixes, strict=True):
                ids = enc.ids[1:] if enc.ids[:1] == [bos_id] else enc.ids
                # a loaded tokenizer may already add EOS itself; never store it twice
                tail = [] if ids[-1:] == [eos_id] and len(ids) > 1 else [eos_id]
                pieces.append(np.array([bos_id] + prefix + ids + tail, dtype=dtype))
            lengths.append(np.array([len(p) for p in pieces], dtype=np.int64))
            flat = np.concatenate(pieces)
            counts += np.bincount(flat, minlength=counts.shape[0])[: counts.shape[0]]
            f.write(flat.tobytes())
            n_tokens += flat.shape[0]
            rate = n_tokens / max(time.perf_counter() - start, 1e-9)
            progress.update(task, advance=len(batch), tokens=n_tokens, rate=f"{rate:,.0f} tok/s")
        f.flush()
        os.fsync(f.fileno())
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(all_lengths, out=offsets[1:])
    np.save(out_dir / docs_name, offsets)
    np.save(out_dir / sources_name, np.array([source_id[d.source] for d in docs], dtype=np.int32))
    names = [bin_name, docs_name, sources_name]
    if with_prefix:
        np.save(out_dir / f"{name}.prefix.npy", np.array(prefix_lengths, dtype=np.int32))
        names.append(f"{name}.prefix.npy")
    files = {}
    for file_name in names:
        path = out_dir / file_name
        _fsync(path)
        files[file_name] = {"bytes": path.stat().st_size, "blake2b": file_digest(path)}
    return {
        "n_tokens": n_tokens,
        "n_docs": len(docs),
        "unigram_entropy": _entropy(counts),
        "files": files,
    }


def read_meta(folder: Path) -> dict:
    """meta.json of a finished shard folder; LmpError if it is missing or unfinished."""
    folder = Path(folder)
    path = folder / META
    fix = f"delete the cache folder {folder} and run the same command again: it rebuilds the cache"
    if not path.is_file():
        raise LmpError(f"token cache {folder} has no {META}, so it was never finished; {fix}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LmpError(f"token cache file {path} is not valid JSON; {fix}") from None
    if not isinstance(meta, dict):
        raise LmpError(f"token cache file {path} is damaged (not a JSON object); {fix}")
    if meta.get("complete") is not True:
        raise LmpError(f'token cache {folder} is incomplete ({META} lacks "complete": true); {fix}')
    if meta.get("format_version") != FORMAT_VERSION:
        raise LmpError(
            f"token cache {folder} has format version {meta.get('format_version')}, "
            f"this lmp reads version {FORMAT_VERSION}; {fix}"
        )
    return meta


def open_shard(folder: Path, name: str, verify: bool = True) -> TokenShard:
    """Open split `name` of a shard folder, memory-mapping its tokens. Sizes are always checked;
    with `verify`, so are the checksums (this reads every byte once)."""
    folder = Path(folder)
    meta = read_meta(folder)
    fix = f"delete the cache folder {folder} and run the same command again: it rebuilds the cache"
    split = meta["splits"].get(name)
    if split is None:
        raise LmpError(
            f"token cache {folder} has no split {name!r} (it has: {', '.join(meta['splits'])}); {fix}"
        )
    for file_name, info in split["files"].items():
        path = folder / file_name
        if not path.is_file():
            raise LmpError(f"token cache file {path} is missing; {fix}")
        size = path.stat().st_size
        if size != info["bytes"]:
            what = "truncated" if size < info["bytes"] else "larger than written"
            raise LmpError(
                f"token cache file {path} is {what}: expected {info['bytes']} bytes, found {size}; {fix}"
            )
        if verify and file_digest(path) != info["blake2b"]:
            raise LmpError(f"token cache file {path} is corrupt: blake2b checksum mismatch; {fix}")
    bin_name, docs_name, sources_name = shard_files(name)
    dtype = np.dtype(meta["dtype"])
    n_tokens = split["n_tokens"]
    if n_tokens:
        tokens = np.memmap(folder / bin_name, dtype=dtype, mode="r", shape=(n_tokens,))
    else:  # numpy cannot map an empty file
        tokens = np.zeros(0, dtype=dtype)
    prefix_name = f"{name}.prefix.npy"
    return TokenShard(
        tokens=tokens,
        doc_offsets=np.load(folder / docs_name),
        doc_sources=np.load(folder / sources_name),
        sources=list(meta["sources"]),
        prefix_lengths=np.load(folder / prefix_name) if prefix_name in split["files"] else None,
    )
