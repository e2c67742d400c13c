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
        **extra,
    }
    args = [str(ROOT / "recipes/demo.yaml")]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args
