"""Read a corpus into documents, split it into train/validation, count words, fingerprint it.

Accepted corpora (recipe field `data.path`):

* `builtin:demo` - English text shipped by installed packages (see `builtin.py`).
* a BabyLM folder (format `babylm`, chosen automatically when the folder holds `*.train` files):
  only the `<source>.train` files are read (childes, bnc_spoken, gutenberg, open_subtitles,
  simple_wiki, switchboard, or any other names), each file's stem is the document's source, and
  its non-empty lines are grouped into documents of `data.lines_per_document` consecutive lines
  (the files are one utterance or sentence per line, with no document markup).
* a folder of text files (or a single text file). Every non-hidden file under the folder is read,
  recursively, in sorted path order; each file's source is its name without the suffix, so
  `train/childes.train` and `dev/childes.dev` are both source `childes`. Documents inside a file:
    - if the file contains two or more consecutive blank lines, those separate documents
      (one blank line is a paragraph break inside a document);
    - otherwise the whole file is one document;
    - a document longer than `data.lines_per_document` lines is cut into consecutive chunks of
      that many lines. Line-per-utterance corpora (BabyLM, subtitles) have no document markup at all, and
      chunking gives the validation split and the BOS/EOS boundaries a useful granularity.
* a `.jsonl` file (or `.jsonl.gz`, or a folder of them): one JSON object per line with the text in
  `data.text_field` and optionally the source name in `data.source_field` (default: the file's
  name). Other string, number and boolean fields are kept as `Document.meta`.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import re
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lm_pretrain.errors import LmpError
from lm_pretrain.jsonl import json_objects
from lm_pretrain.recipe import DataConfig

ACCEPTED = "a BabyLM folder of <source>.train files, a folder of text files, a .jsonl file, or builtin:demo"
_DOC_BREAK = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")  # two or more blank lines


@dataclass(frozen=True)
class Document:
    text: str
    source: str
    # meta does not take part in equality or hashing (dicts are unhashable)
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    # text placed before the document and never trained on (metadata conditioning)
    prefix: str = ""


def read_corpus(cfg: DataConfig) -> list[Document]:
    """All documents of the corpus named by `cfg.path`, in a deterministic order, within the
    recipe's word budget."""
    return apply_word_budget(_read_all(cfg), cfg)


def _read_all(cfg: DataConfig) -> list[Document]:
    if cfg.path.startswith("builtin:"):
        if cfg.path != "builtin:demo":
            raise LmpError(f"data.path {cfg.path!r}: unknown built-in corpus; the only one is builtin:demo")
        from lm_pretrain.data.builtin import demo_documents

        return demo_documents()

    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise LmpError(f"data.path {path} does not exist; expected {ACCEPTED}")
    fmt = cfg.format
    files = _list_files(path)
    if fmt == "auto":
        if all(_is_jsonl(f) for f in files):
            fmt = "jsonl"
        else:
            fmt = "babylm" if any(f.name.endswith(".train") for f in files) else "text"
    if fmt == "jsonl":
        docs = [doc for f in files for doc in _read_jsonl(f, cfg)]
    elif fmt == "babylm":
        docs = _read_babylm(path, files, cfg.lines_per_document)
    else:
        held_out = [f for f in files if f.name.endswith((".dev", ".test"))]
        if held_out and cfg.format == "auto":
            raise LmpError(
                f"data.path {path} holds BabyLM held-out files ({held_out[0].name}, ...) but no "
                "<source>.train files; point data.path at the training folder (e.g. train_10M)"
            )
        docs = [doc for f in files for doc in _read_text_file(f, cfg.lines_per_document)]
    if not docs:
        raise LmpError(f"data.path {path}: the corpus has no documents (its files hold no text)")
    return docs


def _read_babylm(path: Path, files: list[Path], lines_per_document: int) -> list[Document]:
    train_files = [f for f in files if f.name.endswith(".train")]
    if not train_files:
        raise LmpError(f"data.path {path}: format babylm needs <source>.train files, found none")
    folders = sorted({str(f.parent) for f in train_files})
    if len(folders) > 1:
        # e.g. the whole BabyLM download: train_10M and train_100M must not be mixed
        raise LmpError(
            f"data.path {path} holds .train files in {len(folders)} folders ({', '.join(folders[:3])}); "
            "point data.path at the one folder to train on"
        )
    docs = []
    for f in train_files:
        blocks = _read_line_blocks(f, lines_per_document)
        if not blocks:
            raise LmpError(f"{f} is empty; re-download it, or remove it from the corpus folder")
        docs += blocks
    return docs


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def _kind(path: Path) -> str:
    """What a path that is neither a regular file nor a folder is (from stat: nothing is opened)."""
    mode = path.stat().st_mode
    kinds = [
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _list_files(path: Path) -> list[Path]:
    # only regular files are ever opened: reading a FIFO or a device such as /dev/zero would
    # block or never end
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise LmpError(
            f"data.path {path} is {_kind(path)}, not a file or folder of text; expected {ACCEPTED}"
        )
    files, others = [], []
    for p in path.rglob("*"):
        if any(part.startswith(".") for part in p.relative_to(path).parts):
            continue
        if p.is_file():
            files.append(p)
        elif not p.is_dir() and p.exists():  # a FIFO, device or socket (not a dangling link)
            others.append(p)
    if not files and others:
        first = sorted(others)[0]
        raise LmpError(
            f"data.path {path}: the folder holds no regular text files (it has {_kind(first)}: "
            f"{first.relative_to(path)}); expected {ACCEPTED}"
        )
    if not files:
        raise LmpError(f"data.path {path} is an empty folder; expected {ACCEPTED}")
    return sorted(files)


def _source_name(path: Path) -> str:
    name = path.name.removesuffix(".gz")
    return name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name


def _read_text(path: Path) -> str:
    try:
        with _open_text(path) as f:
            return f.read()
    except UnicodeDecodeError:
        raise LmpError(
            f"{path} is not UTF-8 text; remove it from the data folder or convert it to UTF-8"
        ) from None
    except _DAMAGED_GZIP as exc:
        raise _damaged(path, exc) from None


# what reading a truncated or corrupt .gz raises
_DAMAGED_GZIP = (EOFError, gzip.BadGzipFile, zlib.error)


def _damaged(path: Path, exc: BaseException) -> LmpError:
    return LmpError(
        f"{path} is a damaged gzip file ({exc or type(exc).__name__}); download or compress it "
        "again, or remove it from the corpus"
    )


def _read_line_blocks(path: Path, lines_per_document: int) -> list[Document]:
    lines = [line.rstrip() for line in _read_text(path).split("\n") if line.strip()]
    source = _source_name(path)
    return [
        Document("\n".join(lines[i : i + lines_per_document]), source)
        for i in range(0, len(lines), lines_per_document)
    ]


def _read_text_file(path: Path, lines_per_document: int) -> list[Document]:
    text = _read_text(path)
    source = _source_name(path)
    blocks = _DOC_BREAK.split(text) if _DOC_BREAK.search(text) else [text]
    docs = []
    for block in blocks:
        lines = block.strip("\n").split("\n")
        for start in range(0, len(lines), lines_per_document):
            chunk = "\n".join(lines[start : start + lines_per_document]).strip()
            if chunk:
                docs.append(Document(chunk, source))
    return docs


def _open_text(path: Path):
    # newline=None turns \r\n into \n so Windows files tokenize like Unix ones; utf-8-sig drops
    # the byte-order mark some Windows editors write
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline=None)
    return open(path, encoding="utf-8-sig", newline=None)


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with _open_text(path) as f:
            yield from enumerate(f, start=1)
    except UnicodeDecodeError:
        raise LmpError(f"{path} is not UTF-8 text; a .jsonl corpus must be UTF-8") from None
    except _DAMAGED_GZIP as exc:
        raise _damaged(path, exc) from None


def _read_jsonl(path: Path, cfg: DataConfig) -> list[Document]:
    default_source = _source_name(path)
    docs = []
    for lineno, obj in json_objects(_jsonl_lines(path), path, "each line must be one object"):
        if cfg.text_field not in obj:
            raise LmpError(
                f"{path}:{lineno}: no text field {cfg.text_field!r} "
                f"(keys found: {', '.join(obj) or 'none'}); "
                f"set the recipe field data.text_field to the key that holds the text"
            )
        text = obj[cfg.text_field]
        if not isinstance(text, str):
            raise LmpError(
                f"{path}:{lineno}: field {cfg.text_field!r} must be a string, got {type(text).__name__}"
            )
        source = default_source
        if cfg.source_field is not None:
            if obj.get(cfg.source_field, "") is None:
                raise LmpError(
                    f"{path}:{lineno}: the source field {cfg.source_field!r} is null; give every line a "
                    "source, or set data.source_field to null to name sources after the file"
                )
            if cfg.source_field not in obj:
                raise LmpError(
                    f"{path}:{lineno}: no source field {cfg.source_field!r} (keys found: {', '.join(obj)}); "
                    f"fix data.source_field or set it to null to name sources after the file"
                )
            source = str(obj[cfg.source_field])
        meta = {
            k: str(v)
            for k, v in obj.items()
            if k not in (cfg.text_field, cfg.source_field) and isinstance(v, (str, int, float, bool))
        }
        text = text.strip()
        if text:
            docs.append(Document(text, source, meta))
    return docs


def _doc_key(doc: Document) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(doc.source.encode())
    h.update(b"\0")
    h.update(doc.text.encode())
    return h.digest()


def split_documents(
    docs: list[Document], validation_fraction: float
) -> tuple[list[Document], list[Document]]:
    """(train, validation). Membership depends only on each document's (source, text), never on
    the input order or a seed, so the split is stable as a corpus grows. Both keep the input order."""
    n = len(docs)
    # at least one validation document when asked for any, and never the whole corpus
    n_val = min(math.ceil(validation_fraction * n), max(n - 1, 0))
    keys = [_doc_key(d) for d in docs]
    order = sorted(range(n), key=keys.__getitem__)
    chosen = set(order[:n_val])
    # exact duplicates share a key: keep them all on the validation side so none leaks into train
    if n_val:
        last = keys[order[n_val - 1]]
        chosen.update(i for i in order[n_val:] if keys[i] == last)
    train = [d for i, d in enumerate(docs) if i not in chosen]
    val = [d for i, d in enumerate(docs) if i in chosen]
    return train, val


def apply_word_budget(docs: list[Document], cfg: DataConfig) -> list[Document]:
    """The corpus within data.word_budget: unchanged if it fits, else an error or, with
    data.over_budget: subsample, each source cut to its proportional share of the budget.

    Subsampling keeps whole documents, chosen by the same order-independent hash as the split,
    until the source's share is full, so it is deterministic and never exceeds the budget."""
    budget = cfg.word_budget
    if budget is None:
        return docs
    counts = word_counts(docs)
    total = sum(counts.values())
    if total <= budget:
        return docs
    if cfg.over_budget == "error":
        per_source = ", ".join(f"{s} {n:,}" for s, n in counts.items())
        raise LmpError(
            f"data.path {cfg.path} has {total:,} words, over data.word_budget {budget:,} "
            f"({per_source}); set data.over_budget: subsample to keep a proportional share of each "
            "source, or use a smaller corpus"
        )
    share = {source: n * budget // total for source, n in counts.items()}
    used = dict.fromkeys(counts, 0)
    keep = set()
    for i in sorted(range(len(docs)), key=lambda i: _doc_key(docs[i])):
        doc = docs[i]
        words = len(doc.text.split())
        if used[doc.source] + words <= share[doc.source]:
            used[doc.source] += words
            keep.add(i)
    return [d for i, d in enumerate(docs) if i in keep]


def word_counts(docs: list[Document]) -> dict[str, int]:
    """Words per source, sorted by source name; a word is a whitespace-separated piece (BabyLM rule)."""
    counts: dict[str, int] = {}
    for doc in docs:
        counts[doc.source] = counts.get(doc.source, 0) + len(doc.text.split())
    return dict(sorted(counts.items()))


def corpus_fingerprint(docs: list[Document]) -> str:
    """A hash of every document's source and text, in order; length prefixes keep boundaries distinct."""
    h = hashlib.blake2b(digest_size=16)
    for doc in docs:
        for part in (doc.source, doc.text):
            raw = part.encode()
            h.update(len(raw).to_bytes(8, "little"))
            h.update(raw)
    return h.hexdigest()
