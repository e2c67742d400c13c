"""Model folders that transformers loads as LlamaForCausalLM, and lmp reads back.

A folder holds config.json and model.safetensors (tokenizer files are written beside them by
the tokenizer code). A model trained with masked next-token prediction (objective hybrid or
masked_next_token) also gets modeling_lmp.py, registered for AutoModelForMaskedLM. The config is written by hand with the flat keys (rope_theta, rope_scaling,
...) that both transformers 4.x and 5.x read: the BabyLM evaluation pipeline pins transformers
4.51.3, which cannot read the rope_parameters block that 5.x's save_pretrained writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lm_pretrain.errors import LmpError
from lm_pretrain.model.decoder import Decoder, DecoderConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODELING_FILE = "modeling_lmp.py"
MASKED_LM_CLASS = "LmpForMaskedNextToken"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_config_dict(cfg: DecoderConfig, dtype: str = "float32") -> dict:
    """config.json for LlamaForCausalLM, readable by transformers 4.51 and 5.x alike."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": float(cfg.norm_eps),
        "rope_theta": float(cfg.rope_theta),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "initializer_range": float(cfg.init_std),
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if cfg.objective != "causal":
        config["lmp_objective"] = cfg.objective
        config["auto_map"] = {
            "AutoModelForMaskedLM": f"{MODELING_FILE.removesuffix('.py')}.{MASKED_LM_CLASS}"
        }
    return config


def save_model(model: Decoder, out_dir: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write config.json and model.safetensors into out_dir (created if needed)."""
    dtype_name = str(dtype).removeprefix("torch.")
    config = hf_config_dict(model.config, dtype_name)
    tensors = {}
    for name, tensor in model.state_dict().items():
        # A tied output matrix is the embedding: store it once. Both transformers versions
        # re-tie lm_head to embed_tokens on load when tie_word_embeddings is true.
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        tensors[name] = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    # transformers refuses safetensors files whose metadata does not say which framework wrote them
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    if model.config.objective != "causal":
        shutil.copyfile(Path(__file__).with_name("hf_masked_next_token.py"), out_dir / MODELING_FILE)


def decoder_config_from_hf(d: dict) -> DecoderConfig:
    """A DecoderConfig from a Llama config.json dict; LmpError for anything lmp's decoder lacks."""
    if d.get("model_type") != "llama":
        raise LmpError(f"model_type is {d.get('model_type')!r}; lmp reads only llama configs")
    theta = d.get("rope_theta")
    rope = d.get("rope_parameters") or d.get("rope_scaling")
    if isinstance(rope, dict):
        # transformers 5.x writes the rope settings as a block; only plain rope is lmp's
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise LmpError(f"rope scaling {rope!r} is not supported by lmp's decoder (plain rope only)")
        theta = rope.get("rope_theta", theta)
    unsupported = {
        "hidden_act": ("silu", d.get("hidden_act", "silu")),
        "attention_bias": (False, d.get("attention_bias", False)),
        "mlp_bias": (False, d.get("mlp_bias", False)),
    }
    for key, (wanted, got) in unsupported.items():
        if got != wanted:
            raise LmpError(f"{key} is {got!r}; lmp's decoder supports only {wanted!r}")
    required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
    missing = [key for key in required if key not in d]
    if missing:
        raise LmpError(f"the config lacks {', '.join(missing)}")
    hidden, heads = d["hidden_size"], d["num_attention_heads"]
    head_dim = d.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise LmpError(f"head_dim {head_dim} x {heads} heads != hidden_size {hidden}; lmp needs them equal")
    eos = d.get("eos_token_id")
    if isinstance(eos, list):  # some configs list several stop tokens; the first is the main one
        eos = eos[0] if eos else None
    return DecoderConfig(
        vocab_size=d["vocab_size"],
        hidden_size=hidden,
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        intermediate_size=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings", 2048),
        rope_theta=float(theta if theta is not None else 10000.0),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        init_std=float(d.get("initializer_range", 0.02)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=d.get("pad_token_id"),
        objective=d.get("lmp_objective", "causal"),
    )


def load_model(path: Path | str, device: str | torch.device = "cpu") -> Decoder:
    """An lmp-exported folder (config.json + model.safetensors) as a Decoder in fp32."""
    folder = Path(path)
    hint = "point at a model folder written by lmp (a run's final/ or a checkpoint's step-N/)"
    if not folder.is_dir():
        raise LmpError(f"model folder {folder} does not exist; {hint}")
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise LmpError(f"{needed} is missing; {hint}")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmpError(f"{config_path} is not valid JSON ({exc}); re-export the model") from None
    if not isinstance(raw, dict):
        raise LmpError(f"{config_path} must hold a JSON object; re-export the model")
    try:
        cfg = decoder_config_from_hf(raw)
    except LmpError as exc:
        raise LmpError(f"{config_path}: {exc}") from None

    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise LmpError(f"{weights_path} cannot be read ({exc}); re-export the model") from None
    # older transformers stored the rotary frequencies; lmp derives them from the config
    weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)  # transformers, too, uses the embedding when tied

    model = Decoder(cfg)
    expected = {
        k: v for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")
    }
    problems = [f"missing {k}" for k in expected if k not in weights]
    problems += [f"unexpected {k}" for k in weights if k not in expected]
    problems += [
        f"{k} has shape {tuple(weights[k].shape)}, config.json implies {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise LmpError(f"{weights_path} does not match {config_path}: {shown}; re-export the model")
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    return model.to(device)
