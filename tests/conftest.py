import json
from pathlib import Path

import pytest

from lm_pretrain.data.builtin import demo_documents

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def bible_corpus(tmp_path_factory) -> Path:
    """About 150k words of the built-in corpus's Bible text as a jsonl file."""
    docs = [d for d in demo_documents() if d.source == "bible_bbe"][:200]
    path = tmp_path_factory.mktemp("corpus") / "bible.jsonl"
    path.write_text("".join(json.dumps({"text": d.text, "source": d.source}) + "\n" for d in docs))
    return path


def tiny_run_args(corpus: Path, cache: Path, steps: int, **extra: object) -> list[str]:
    """`--set` arguments that shrink recipes/demo.yaml to a seconds-long run on `corpus`."""
    sets: dict[str, object] = {
        "data.path": corpus,
        "data.source_field": "source",
        "data.validation_fraction": 0.05,
        "data.cache_dir": cache,
        "tokenizer.vocab_size": 1024,
        "model.hidden_size": 64,
        "model.num_layers": 2,
        "model.num_heads": 2,
        "model.max_seq_len": 64,
        "train.batch_size": 16,
        "train.micro_batch_size": 8,
        "train.max_steps": steps,
        "train.log_every": 5,
        "train.eval_every": 20,
        "train.eval_tokens": 4096,
        "checkpoint.every": 20,
        "checkpoint.keep_last": 2,
        "optim.lr": 3e-3,
        # the demo trains with Muon; the tests keep AdamW, which every mode supports (FSDP among them)
        "optim.kind": "adamw",
        # the demo compiles; the tests train eagerly unless they test compile (seconds, not minutes)
        "train.compile": "false",
        # one thread: tiny matrices gain nothing from two, and a busy machine slows two threads badly
        "train.num_threads": 1,
        "eval": None,
        **extra,
    }
    args = [str(ROOT / "recipes/demo.yaml")]
    for key, value in sets.items():
        args += ["--set", f"{key}={'null' if value is None else value}"]
    return args


BABYLM_MIX = {
    "childes": 0.29,
    "gutenberg": 0.26,
    "open_subtitles": 0.20,
    "simple_wiki": 0.15,
    "bnc_spoken": 0.08,
    "switchboard": 0.01,
}
_SUBJECTS = ["the dog", "a cat", "my mother", "the teacher", "we", "they", "the children", "you"]
_VERBS = ["sees", "likes", "wants", "found", "made", "took", "gave", "knows"]
_OBJECTS = ["the ball", "a red book", "some water", "the big house", "a small bird", "it", "them"]
_TAILS = ["today", "again", "in the garden", "after school", "very quickly", "", "", ""]


def write_babylm_folder(root: Path, total_words: int, seed: int = 0) -> dict[str, int]:
    """A BabyLM-layout corpus of synthetic sentences: train/<source>.train in the 2024/2025 mix,
    plus dev/<source>.dev files that readers must ignore. Returns the words written per source."""
    import numpy as np

    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "dev").mkdir(exist_ok=True)
    pieces = [_SUBJECTS, _VERBS, _OBJECTS, _TAILS]
    written = {}
    for source, share in BABYLM_MIX.items():
        target = max(1, int(total_words * share))
        lines, words = [], 0
        while words < target:
            picks = [rng.integers(len(p), size=4096) for p in pieces]
            for i in range(4096):
                line = " ".join(p[k[i]] for p, k in zip(pieces, picks, strict=True)).strip() + " ."
                lines.append(line)
                words += len(line.split())
                if words >= target:
                    break
        (root / "train" / f"{source}.train").write_text("\n".join(lines) + "\n")
        (root / "dev" / f"{source}.dev").write_text("this line is held out .\n")
        written[source] = words
    return written
