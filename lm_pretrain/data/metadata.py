"""Metadata conditioning (MeCo): a document's metadata rendered as a prefix it is trained after.

The reference (Gao et al., 2025) prefixes each document with "URL: <domain>\\n\\n", trains with no
loss on the prefix, and drops the prefixes for the last 10% of training tokens (the cooldown).
For BabyLM-scale corpora the natural metadata is the source (childes, gutenberg, ...).
"""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import urlsplit

from lm_pretrain.data.corpus import Document
from lm_pretrain.errors import LmpError
from lm_pretrain.recipe import MetadataConfig


def domain(url: str) -> str:
    """The host of a URL, without scheme, credentials, port or path ("https://a.b/c" -> "a.b")."""
    host = urlsplit(url if "//" in url else f"//{url}").hostname
    return host or url


def metadata_value(doc: Document, cfg: MetadataConfig) -> str:
    if cfg.field == "source":
        value = doc.source
    elif cfg.field in doc.meta:
        value = doc.meta[cfg.field]
    else:
        found = ", ".join(["source", *doc.meta]) or "source"
        raise LmpError(
            f"data.metadata.field {cfg.field!r} is missing from a document of source {doc.source!r} "
            f"(fields found: {found}); choose one of those"
        )
    return domain(value) if cfg.kind == "url" else value


def with_metadata(docs: list[Document], cfg: MetadataConfig) -> list[Document]:
    """The same documents, each with its rendered metadata prefix."""
    template = cfg.resolved_template
    return [replace(doc, prefix=template.format(value=metadata_value(doc, cfg))) for doc in docs]
