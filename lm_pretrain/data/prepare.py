"""`prepare_data(recipe)`: corpus -> split -> tokenizer -> token shards, each cached on disk.

Cache root: recipe `data.cache_dir`, else $LMP_CACHE, else ~/.cache/lmp. Under it:

    tokenizers/<key>/tokenizer.json   key: hash of the train split and the tokenizer config
                                      (or of the given tokenizer file when tokenizer.path is set)
    shards/<key>/                     key: hash of the corpus, the validation fraction, the
                                      tokenizer.json bytes and the shard format version

Both are built in a temporary sibling folder and renamed into place, so a killed prepare never
leaves a folder that looks finished; two processes preparing at once both succeed (the second
rename loses and its copy is dropped).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tokenizers import Tokenizer

from lm_pretrain.data.corpus import Document, corpus_fingerprint, read_corpus, split_documents, word_counts
from lm_pretrain.data.metadata import with_metadata
from lm_pretrain.data.shards import FORMAT_VERSION, META, TokenShard, build_shards, open_shard, read_meta
from lm_pretrain.data.tokenizer import load_tokenizer, special_token_ids, train_tokenizer
from lm_pretrain.errors import LmpError, check_writable
from lm_pretrain.recipe import Recipe

TOKENIZER_FORMAT_VERSION = 2  # 2: long non-space runs split before BPE


@dataclass
class PreparedData:
    cache_dir: Path  # the shard folder
    tokenizer: Tokenizer
    tokenizer_path: Path  # the cached tokenizer.json
    train: TokenShard
    val: TokenShard
    word_counts: dict[str, dict[str, int]]  # split -> source -> words
    unigram_entropy: float  # nats/token of the train tokens' unigram distribution
    reused: bool  # the token shards came from the cache
    special_ids: dict[str, int]  # pad, bos, eos, mask
    corpus_fingerprint: str  # a hash of every document, to tell whether a run's corpus changed
    train_meta: TokenShard | None = None  # the train split with metadata prefixes (data.metadata)


def cache_root(recipe: Recipe) -> Path:
    root = recipe.data.cache_dir or os.environ.get("LMP_CACHE") or "~/.cache/lmp"
    return Path(root).expanduser()


def check_outside_corpus(recipe: Recipe, path: Path, what: str) -> None:
    """Refuse a folder lmp writes inside the corpus folder: its files would be read as corpus
    text the next time the data is prepared (and a run could then never resume)."""
    corpus = Path(recipe.data.path).expanduser()
    if recipe.data.path.startswith("builtin:") or not corpus.is_dir():
        return
    if path.expanduser().resolve().is_relative_to(corpus.resolve()):
        raise LmpError(
            f"{what} {path} is inside the corpus folder {recipe.data.path}, whose files are all read "
            "as training text; put it outside that folder"
        )


def _key(*parts: str | bytes) -> str:
    h = hashlib.blake2b(digest_size=12)
    for part in parts:
        raw = part.encode() if isinstance(part, str) else part
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


# a temporary build folder: .tmp-<final name>-<host>-<pid>-<random>; the host and pid say whose
# it is, so a folder left by a killed prepare can be told from one still being written
_TMP_NAME = re.compile(r"^\.tmp-(?P<name>[^-]+)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temporary build folders in `folder` whose owner process is gone (a prepare
    killed mid-write), and return them. A folder of a live process, of another host (a shared
    cache) or in an older naming without the host is left alone."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:  # no cache yet, or unreadable: nothing to clean
        return removed
    host = _host()
    for entry in entries:
        match = _TMP_NAME.match(entry.name)
        if match is None or match["host"] != host or not entry.is_dir():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _process_alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _build_atomically(final: Path, build: Callable[[Path], None], done: Callable[[Path], bool]) -> None:
    """Run build(tmp) in a fresh sibling folder, then rename it to `final`."""
    if final.exists() and not done(final):
        raise LmpError(
            f"cache folder {final} exists but was never finished; delete it and run the same command again"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not done(final):  # not a lost race with another process: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prepare_tokenizer(
    recipe: Recipe, train_docs: list[Document], root: Path, console: Console, show_progress: bool
) -> tuple[Tokenizer, Path]:
    cfg = recipe.tokenizer
    config_json = cfg.model_dump_json()
    if cfg.path is not None:
        given = Path(cfg.path).expanduser()
        given_file = given / "tokenizer.json" if given.is_dir() else given
        source = load_tokenizer(given_file, cfg)  # validates before anything is cached
        key = _key("given", given_file.read_bytes(), config_json, str(TOKENIZER_FORMAT_VERSION))
    else:
        key = _key("trained", corpus_fingerprint(train_docs), config_json, str(TOKENIZER_FORMAT_VERSION))
    folder = root / "tokenizers" / key
    path = folder / "tokenizer.json"
    if path.is_file():
        console.print(f"tokenizer: reused {path}")
        try:
            return load_tokenizer(path, cfg), path
        except LmpError as exc:
            raise LmpError(
                f"the cached tokenizer is damaged ({exc}); delete the cache folder {folder} and run "
                "the same command again: it rebuilds the tokenizer"
            ) from None

    def build(tmp: Path) -> None:
        if cfg.path is not None:
            tok = source
        else:
            # a rich spinner instead of the tokenizers progress bar, which garbles rich output
            status = f"training a {cfg.vocab_size:,}-entry BPE tokenizer"
            with console.status(status) if show_progress else contextlib.nullcontext():
                tok = train_tokenizer((d.text for d in train_docs), cfg)
        tok.save(str(tmp / "tokenizer.json"))

    start = time.perf_counter()
    _build_atomically(folder, build, lambda f: (f / "tokenizer.json").is_file())
    tok = load_tokenizer(path, cfg)
    how = "trained on the train split"
    if cfg.path is None and tok.get_vocab_size() < cfg.vocab_size:
        how += (
            f" (only {tok.get_vocab_size():,} of tokenizer.vocab_size {cfg.vocab_size:,}: the corpus ran out "
            f"of merges seen {cfg.min_frequency}+ times; the model uses the smaller vocabulary)"
        )
    if cfg.path is not None:
        how = f"copied from {cfg.path} (its own vocabulary: tokenizer.vocab_size is not used)"
    console.print(
        f"tokenizer: {how}, vocab {tok.get_vocab_size():,}, in {time.perf_counter() - start:.1f}s -> {path}"
    )
    return tok, path


def _corpus_table(
    recipe: Recipe, splits: dict[str, list[Document]], counts: dict[str, dict[str, int]]
) -> Table:
    table = Table(title=f"corpus {recipe.data.path}")
    table.add_column("source")
    for name in splits:
        table.add_column(f"{name} docs", justify="right")
        table.add_column(f"{name} words", justify="right")
    docs_per = {name: {} for name in splits}
    for name, docs in splits.items():
        for doc in docs:
            docs_per[name][doc.source] = docs_per[name].get(doc.source, 0) + 1
    sources = sorted({s for c in counts.values() for s in c})
    for source in sources:
        row = [source]
        for name in splits:
            row += [f"{docs_per[name].get(source, 0):,}", f"{counts[name].get(source, 0):,}"]
        table.add_row(*row)
    total = ["total"]
    for name, docs in splits.items():
        total += [f"{len(docs):,}", f"{sum(counts[name].values()):,}"]
    table.add_row(*total, style="bold")
    budget = recipe.data.word_budget
    if budget is not None:
        words = sum(sum(c.values()) for c in counts.values())
        table.caption = f"{words:,} words of the {budget:,}-word budget ({100 * words / budget:.2f}%)"
    return table


def prepare_data(recipe: Recipe, console: Console | None = None, show_progress: bool = True) -> PreparedData:
    """Read, split and tokenize the recipe's corpus, reusing cached tokenizers and shards.
    Reports go to `console`; with None (e.g. non-main training processes) nothing is printed."""
    console = console or Console(quiet=True)
    root = cache_root(recipe)
    check_outside_corpus(recipe, root, "data.cache_dir")
    check_writable(root, "data.cache_dir")
    docs = read_corpus(recipe.data)
    train_docs, val_docs = split_documents(docs, recipe.data.validation_fraction)
    if docs and not train_docs:
        raise LmpError(
            f"the training split is empty: the {len(docs):,} documents of {recipe.data.path} are copies "
            "of one another, and copies all go to validation so that none leaks into training; "
            "train on a corpus of different documents"
        )
    splits = {"train": train_docs, "val": val_docs}
    counts = {name: word_counts(split) for name, split in splits.items()}
    console.print(_corpus_table(recipe, splits, counts))

    for folder in (root / "tokenizers", root / "shards"):
        remove_stale_temps(folder)  # left by a prepare killed mid-write
    tok, tok_path = _prepare_tokenizer(recipe, train_docs, root, console, show_progress)
    ids = special_token_ids(tok, recipe.tokenizer)

    metadata = recipe.data.metadata
    shard_splits = dict(splits)
    if metadata is not None:  # MeCo: the train documents again, each after its metadata prefix
        shard_splits["train_meta"] = with_metadata(train_docs, metadata)
    fingerprint = corpus_fingerprint(docs)
    key = _key(
        fingerprint,
        repr(recipe.data.validation_fraction),
        tok_path.read_bytes(),
        str(FORMAT_VERSION),
        metadata.model_dump_json() if metadata is not None else "",
    )
    folder = root / "shards" / key
    reused = folder.exists()  # only a finished build is renamed into place; open_shard checks it
    if reused:
        console.print(f"token cache: reused {folder} (verifying checksums)")
    else:
        start = time.perf_counter()

        def build(tmp: Path) -> None:
            build_shards(
                shard_splits,
                tok,
                tmp,
                bos_id=ids["bos"],
                eos_id=ids["eos"],
                show_progress=show_progress,
                console=console,
            )

        _build_atomically(folder, build, lambda f: (f / META).is_file())
        console.print(f"token cache: built {folder} in {time.perf_counter() - start:.1f}s")

    # a fresh build was hashed as it was written; only a reused cache needs its bytes re-read
    train = open_shard(folder, "train", verify=reused)
    val = open_shard(folder, "val", verify=reused)
    train_meta = open_shard(folder, "train_meta", verify=reused) if metadata is not None else None
    meta = read_meta(folder)
    entropy = float(meta["splits"]["train"]["unigram_entropy"])
    words = sum(counts["train"].values())
    per_word = train.n_tokens / words if words else float("nan")
    console.print(
        f"tokens: train {train.n_tokens:,} ({per_word:.2f} per word), val {val.n_tokens:,}; "
        f"vocab {tok.get_vocab_size():,} ({meta['dtype']}); "
        f"train unigram entropy {entropy:.3f} nats/token"
    )
    return PreparedData(
        cache_dir=folder,
        tokenizer=tok,
        tokenizer_path=tok_path,
        train=train,
        val=val,
        word_counts=counts,
        unigram_entropy=entropy,
        reused=reused,
        special_ids=ids,
        corpus_fingerprint=fingerprint,
        train_meta=train_meta,
    )
