"""Byte-level BPE tokenizers (HF `tokenizers`): train, load, and save in a transformers-loadable form.

Special tokens take ids 0..3 in the fixed order pad, bos, eos, mask (`SPECIAL_ROLES`), so a
recipe's special tokens always land on the same ids. Every encoded sequence starts with BOS (a
TemplateProcessing post-processor, as Llama does); EOS is appended by the shard writer, not here.
Byte-level means every string round-trips: there is no unknown token. A reused tokenizer
(tokenizer.path) keeps its ids; pad and mask tokens it lacks are appended after its vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lm_pretrain.errors import LmpError
from lm_pretrain.recipe import TokenizerConfig

SPECIAL_ROLES = ("pad", "bos", "eos", "mask")
MAX_PIECE = 100


def special_tokens(cfg: TokenizerConfig) -> dict[str, str]:
    """role -> token text, in id order."""
    tokens = {role: getattr(cfg, f"{role}_token") for role in SPECIAL_ROLES}
    if len(set(tokens.values())) != len(tokens):
        raise LmpError(
            f"tokenizer special tokens must be distinct, got {tokens}; "
            f"change tokenizer.pad_token / bos_token / eos_token / mask_token"
        )
    return tokens


def _bos_template(bos: str, bos_id: int) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE with `cfg.vocab_size` entries (fewer if the corpus runs out of merges)."""
    specials = special_tokens(cfg)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # runs of 100+ non-space characters (base64, minified code) cut into 100-character
            # pieces: BPE training time grows with the square of a piece's length
            pre_tokenizers.Split(Regex(rf"\S{{{MAX_PIECE}}}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(specials.values()),  # trainer assigns ids in list order: 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = _bos_template(specials["bos"], tok.token_to_id(specials["bos"]))
    return tok


def special_token_ids(tok: Tokenizer, cfg: TokenizerConfig) -> dict[str, int]:
    """{"pad": id, "bos": id, "eos": id, "mask": id}; LmpError if the tokenizer lacks one."""
    ids = {}
    for role, text in special_tokens(cfg).items():
        token_id = tok.token_to_id(text)
        if token_id is None:
            raise LmpError(
                f"the tokenizer has no {role} token {text!r}; set tokenizer.{role}_token in the recipe "
                f"to a token it has, or train a new tokenizer (leave tokenizer.path unset)"
            )
        ids[role] = token_id
    return ids


def load_tokenizer(path: str | Path, cfg: TokenizerConfig | None = None) -> Tokenizer:
    """Load tokenizer.json (or a folder holding one). With `cfg`, check its special tokens exist and
    make sure encodings start with BOS, adding the BOS post-processor if the file has none."""
    path = Path(path).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise LmpError(
            f"tokenizer {file} does not exist; tokenizer.path must be a tokenizer.json file or a folder "
            f"holding one (leave it unset to train a tokenizer on the corpus)"
        )
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust side raises a bare Exception on malformed files
        raise LmpError(
            f"tokenizer {file} could not be read ({exc}); is it a HF tokenizers JSON file?"
        ) from None
    # shards hold whole documents: never truncate or pad them
    tok.no_truncation()
    tok.no_padding()
    if cfg is not None:
        # a reused tokenizer (e.g. GPT-2's) often lacks padding and mask tokens, which only some
        # objectives use: append them rather than refuse. BOS and EOS must exist (a typo otherwise).
        specials = special_tokens(cfg)
        missing = [specials[r] for r in ("pad", "mask") if tok.token_to_id(specials[r]) is None]
        tok.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in missing])
        ids = special_token_ids(tok, cfg)
        if tok.encode("a").ids[:1] != [ids["bos"]]:
            tok.post_processor = _bos_template(cfg.bos_token, ids["bos"])
    return tok


def save_hf_tokenizer(tok: Tokenizer, out_dir: Path, cfg: TokenizerConfig, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json so that
    `AutoTokenizer.from_pretrained(out_dir)` gives a fast tokenizer that encodes exactly like `tok`
    (BOS first) in transformers 4.4x and 5.x alike. We do not use transformers' save_pretrained:
    5.x writes tokenizer_class "TokenizersBackend", which 4.x cannot load."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = special_token_ids(tok, cfg)
    specials = special_tokens(cfg)
    tok.save(str(out_dir / "tokenizer.json"))
    tokens_map = {f"{role}_token": text for role, text in specials.items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokens_map,
        "unk_token": None,
        "model_max_length": model_max_length,
        # 5.x rebuilds the post-processor from these flags; it gives the same BOS-first template
        "add_bos_token": True,
        "add_eos_token": False,
        # keep decode(encode(x)) == x: no space clean-up
        "clean_up_tokenization_spaces": False,
        "padding_side": "right",
        "added_tokens_decoder": {
            str(ids[role]): {
                "content": text,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for role, text in sorted(specials.items(), key=lambda item: ids[item[0]])
        },
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(tokens_map, indent=2) + "\n")


def first_token_difference(
    ours: Tokenizer, theirs: Tokenizer, names: tuple[str, str] = ("the student", "the teacher")
) -> str | None:
    """The first token id the two tokenizers map differently, described with `names` (None: the same)."""
    a = {i: token for token, i in ours.get_vocab().items()}
    b = {i: token for token, i in theirs.get_vocab().items()}
    for i in range(max(len(a), len(b))):
        if a.get(i) != b.get(i):
            describe = lambda token: "no token" if token is None else repr(token)  # noqa: E731
            return f"id {i} is {describe(a.get(i))} for {names[0]} and {describe(b.get(i))} for {names[1]}"
    return None
