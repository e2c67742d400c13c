"""A Llama-style decoder-only transformer in one file.

Pre-norm blocks with RMSNorm, rotary position embeddings, grouped-query attention and a SwiGLU
MLP, no biases. Parameter names are exactly those of transformers' LlamaForCausalLM, so a
state_dict exports without renaming (see export.py) and the exported model computes the same
logits in transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from lm_pretrain.recipe import ModelConfig

try:  # PyTorch >= 2.9: flash attention over packed variable-length documents, on CUDA
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

IGNORE_INDEX = -100


@dataclass
class DecoderConfig:
    vocab_size: int
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 704
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    # special token ids are written to the exported config; the model itself does not use them
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # how the model was trained; masked_next_token and hybrid models also export a bidirectional
    # AutoModelForMaskedLM class (export.py), the decoder itself runs whatever mask it is given
    objective: str = "causal"

    def __post_init__(self) -> None:
        # recipes are validated in recipe.py; this guards direct construction
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size}, num_heads {self.num_heads} and num_kv_heads "
                f"{self.num_kv_heads} must divide evenly"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_recipe(
        cls,
        model: ModelConfig,
        vocab_size: int,
        bos_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int | None,
        objective: str = "causal",
    ) -> DecoderConfig:
        """The recipe's model section plus what the tokenizer decides (vocabulary, special ids).

        num_kv_heads defaults to num_heads (plain multi-head attention). intermediate_size
        defaults to 8/3 * hidden_size rounded up to a multiple of 64: SwiGLU has three matrices
        instead of two, so 8/3 keeps the MLP's parameter count that of a 4x GELU MLP, and a
        multiple of 64 keeps matrix shapes friendly to fast kernels.
        """
        intermediate = model.intermediate_size or default_intermediate_size(model.hidden_size)
        return cls(
            vocab_size=vocab_size,
            hidden_size=model.hidden_size,
            num_layers=model.num_layers,
            num_heads=model.num_heads,
            num_kv_heads=model.num_kv_heads or model.num_heads,
            intermediate_size=intermediate,
            max_seq_len=model.max_seq_len,
            rope_theta=model.rope_theta,
            norm_eps=model.norm_eps,
            tie_embeddings=model.tie_embeddings,
            init_std=model.init_std,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            objective=objective,
        )


def default_intermediate_size(hidden_size: int) -> int:
    """SwiGLU width when a recipe gives none: 8/3 x hidden, rounded up to a multiple of 64."""
    return int(math.ceil(8 * hidden_size / 3 / 64)) * 64


class DecoderOutput(NamedTuple):
    logits: torch.Tensor | None
    loss: torch.Tensor | None
    # with return_token_losses: each target's cross-entropy [B*T], detached (0 where ignored)
    token_losses: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # with return_hidden: the final normed hidden states


class DistillTargets(NamedTuple):
    """What the chunked loss needs of the teachers: each one's final hidden states [B, T, H_k] and
    output matrix [vocab, H_k] (their logits are made a chunk at a time, as the student's), the
    distillation loss's share of the loss, and the softmax temperature."""

    hiddens: tuple[torch.Tensor, ...]
    heads: tuple[torch.Tensor, ...]
    share: float
    temperature: float


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 and cast back before scaling, exactly as transformers' LlamaRMSNorm
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ---------------------------------------------------------------- rotary embeddings


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [max_seq_len, head_dim], in transformers' Llama layout.

    Each frequency appears twice, once in each half of the head (cat(freqs, freqs)), which
    pairs dimension i with i + head_dim/2 for rotate_half rather than adjacent pairs.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    positions = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, head_dim] by position; cos/sin broadcast as [T, D] or [B, 1, T, D]."""
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------- the blocks


def fused_linear(x: torch.Tensor, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    """Several bias-free projections of the same input as one matmul, since a wider matmul runs
    faster (eager lmp went from 1.08x to 1.23x transformers eager at hidden 256 on a 2-core CPU;
    compiled, no change). The weights stay separate tensors: checkpoints, exports and Muon are as before."""
    weight = torch.cat([layer.weight for layer in layers])
    return F.linear(x, weight).split([layer.out_features for layer in layers], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = fused_linear(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.num_kv_heads != self.num_heads:
            # Query head h reads kv head h // group. Repeating (rather than SDPA's enable_gqa) keeps
            # every fused kernel available, also with a mask, and is as fast on CPU.
            group = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        if cu_seqlens is not None:
            # the batch as one stream of documents, each attended causally on its own
            q, k, v = (t.transpose(1, 2).reshape(B * T, self.num_heads, self.head_dim) for t in (q, k, v))
            y = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, T, T, window_size=(-1, 0))
            return self.o_proj(y.reshape(B, T, -1))
        if q.device.type == "cpu" and torch.compiler.is_compiling():
            y = CompiledCpuAttention.apply(q, k, v, attn_mask)
        elif attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # the caller's mask (True = may attend) replaces causality, e.g. causal within documents
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class CompiledCpuAttention(torch.autograd.Function):
    """Attention for torch.compile'd training on CPU, causal or under the caller's boolean mask
    (True = may attend), written out as batched matmuls and elementwise ops for inductor to fuse.

    PyTorch's CPU flash backward is several times slower than its forward (hidden 256, seq 256,
    bf16: 16 ms against 2 ms per layer). Causal attention runs in blocks of ATTENTION_BLOCK_ROWS
    (the forward a block of queries at a time, the backward a block of keys), which skips the
    blocks above the diagonal and keeps each block's scores in cache: forward and backward of a
    layer took 78 ms against 160 ms for the CPU flash forward and a whole-matrix backward (batch 8,
    8 heads, seq 512, 2 cores), 19 against 27 ms at batch 16, 4 heads, seq 256. Under a mask the
    forward is the CPU flash kernel and the backward recomputes the whole probability matrix from
    the saved log-sum-exp. In eager mode the unfused elementwise passes are slower than the
    kernels, so this is used only under compile.
    """

    @staticmethod
    def forward(ctx, q, k, v, attn_mask):  # noqa: ANN001, ANN205
        if attn_mask is None:
            out, lse = _causal_attention_forward(q, k, v)
        else:
            bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~attn_mask, -math.inf
            )
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, False, attn_mask=bias
            )[:2]
        ctx.save_for_backward(q, k, v, out, lse, attn_mask)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        q, k, v, out, lse, allowed = ctx.saved_tensors
        # softmax backward: dS = P * (dP - rowsum(dO * O)), probabilities and dS in fp32 as the
        # kernel's own softmax, matmuls in the inputs' dtype
        row_dot = (grad_out.float() * out.float()).sum(-1, keepdim=True)
        if allowed is None:
            return *_causal_attention_backward(q, k, v, lse, row_dot, grad_out), None
        scale = 1 / math.sqrt(q.size(-1))
        scores = (q @ k.transpose(-1, -2)).float() * scale
        probs = torch.exp(scores - lse.unsqueeze(-1)).masked_fill(~allowed, 0.0)
        grad_v = probs.to(q.dtype).transpose(-1, -2) @ grad_out
        grad_probs = (grad_out @ v.transpose(-1, -2)).float()
        grad_scores = (probs * (grad_probs - row_dot) * scale).to(q.dtype)
        return grad_scores @ k, grad_scores.transpose(-1, -2) @ q, grad_v, None


# Rows per block of the compiled CPU causal attention (64 beat 128 and whole matrices at seq 256
# and 512 on a 2-core CPU)
ATTENTION_BLOCK_ROWS = 64


def _row_blocks(n: int) -> list[tuple[int, int]]:
    return [(s, min(s + ATTENTION_BLOCK_ROWS, n)) for s in range(0, n, ATTENTION_BLOCK_ROWS)]


def _causal_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention a block of queries at a time, each block against the keys up to its last
    row: the output and each row's log-sum-exp of the scores (fp32)."""
    scale = 1 / math.sqrt(q.size(-1))
    outs, lses = [], []
    for s, e in _row_blocks(q.size(-2)):
        scores = (q[:, :, s:e] @ k[:, :, :e].transpose(-1, -2)).float() * scale
        allowed = torch.ones(e - s, e, dtype=torch.bool, device=q.device).tril(s)
        scores = scores.masked_fill(~allowed, -math.inf)
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.exp(scores - lse.unsqueeze(-1)).to(q.dtype) @ v[:, :, :e])
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _causal_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    row_dot: torch.Tensor,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of causal attention a block of keys at a time, each block against the
    queries from its first row on; the probabilities are recomputed from the saved log-sum-exp."""
    T = q.size(-2)
    scale = 1 / math.sqrt(q.size(-1))
    grad_q, grad_k, grad_v = None, [], []
    for s, e in _row_blocks(T):
        queries, grads = q[:, :, s:], grad_out[:, :, s:]
        scores = (queries @ k[:, :, s:e].transpose(-1, -2)).float() * scale
        allowed = torch.ones(T - s, e - s, dtype=torch.bool, device=q.device).tril()
        probs = torch.exp(scores - lse[:, :, s:, None]).masked_fill(~allowed, 0.0)
        grad_v.append(probs.to(q.dtype).transpose(-1, -2) @ grads)
        grad_probs = (grads @ v[:, :, s:e].transpose(-1, -2)).float()
        grad_scores = (probs * (grad_probs - row_dot[:, :, s:]) * scale).to(q.dtype)
        grad_k.append(grad_scores.transpose(-1, -2) @ queries)
        # this block's share of the queries' gradient, for rows s onward, summed in fp32
        part = F.pad((grad_scores @ k[:, :, s:e]).float(), (0, 0, s, 0))
        grad_q = part if grad_q is None else grad_q + part
    return grad_q.to(q.dtype), torch.cat(grad_k, dim=2), torch.cat(grad_v, dim=2)


def use_varlen_attention(device: torch.device) -> bool:
    """Whether packed documents can go through variable-length flash attention: PyTorch has it,
    the device is CUDA, and autocast runs in bf16 or fp16 (flash kernels take nothing else)."""
    return (
        varlen_attn is not None
        and device.type == "cuda"
        and torch.is_autocast_enabled("cuda")
        and torch.get_autocast_dtype("cuda") in (torch.bfloat16, torch.float16)
    )


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = fused_linear(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cu_seqlens)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """The body (transformers' LlamaModel): embeddings, blocks, final norm, rotary tables."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        # derived from the config, so kept out of the state_dict (transformers does not store them)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)


# ---------------------------------------------------------------- the loss

# Rows of final hidden states per loss chunk. 1024 rows x a vocabulary of 8192 is 32 MiB of fp32
# logits at a time instead of B*T x vocab, and still large enough for fast matmuls.
LOSS_CHUNK_ROWS = 1024


def chunked_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    loss_weights: torch.Tensor | None = None,
    chunk_rows: int = LOSS_CHUNK_ROWS,
    token_losses: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of (hidden @ weight.T) against targets, positions holding -100 ignored.

    Equal to F.cross_entropy(lm_head(hidden).float(), targets) but computed over row chunks, so
    the full [B*T, vocab] logits never exist, neither in forward nor kept for backward. Under
    autocast the matmuls run in autocast's dtype, as lm_head would, and the softmax in fp32.
    With loss_weights (shaped like targets, zero where ignored) the result is the weighted sum.
    With token_losses, (loss, each target's detached cross-entropy, 0 where ignored).
    """
    h = hidden.reshape(-1, hidden.size(-1))
    t = targets.reshape(-1)
    valid = t != IGNORE_INDEX
    if loss_weights is None:
        w, denominator = valid.float(), valid.sum()
    else:
        w, denominator = loss_weights.reshape(-1).float(), torch.ones((), device=h.device)
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        loss, losses = _ChunkedLMLoss.apply(h, weight, t, w, denominator, dtype, chunk_rows)
        return (loss, losses) if token_losses else loss
    with torch.autocast(device, enabled=False):
        hc, wc = h.to(dtype), weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        losses = torch.empty(h.size(0), dtype=torch.float32, device=h.device)
        for start in range(0, h.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = (hc[rows] @ wc.T).float()
            losses[rows] = F.cross_entropy(logits, t[rows], ignore_index=IGNORE_INDEX, reduction="none")
            total += (losses[rows] * w[rows]).sum()
    return (total / denominator, losses) if token_losses else total / denominator


class _ChunkedLMLoss(torch.autograd.Function):
    """The loss and both input gradients in one pass over the chunks (as Liger-Kernel's fused
    linear cross-entropy does): backward only scales the stored gradients, so no logits are kept
    for it and none are recomputed."""

    @staticmethod
    def forward(ctx, h, weight, targets, w, denominator, dtype, chunk_rows):  # noqa: ANN001, ANN205
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            w = w * (targets != IGNORE_INDEX)
            safe = torch.where(targets != IGNORE_INDEX, targets, 0)  # ignored rows: column 0, weight 0
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            losses = torch.empty(h.size(0), dtype=torch.float32, device=h.device)
            vocab_ids = torch.arange(weight.size(0), device=h.device)
            grad_h = torch.empty_like(hc)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for start in range(0, h.size(0), chunk_rows):
                rows = slice(start, start + chunk_rows)
                logits = (hc[rows] @ wc.T).float()
                lse = torch.logsumexp(logits, dim=-1)
                target_logit = logits.gather(1, safe[rows, None]).squeeze(1)
                total += ((lse - target_logit) * w[rows]).sum()
                losses[rows] = torch.where(targets[rows] != IGNORE_INDEX, lse - target_logit, 0.0)
                # d(summed loss)/d(logits) = w * (softmax - one_hot(target)), zero on ignored rows
                if torch.compiler.is_compiling():
                    # one elementwise expression, which inductor fuses into a single pass that
                    # writes the gradient in `dtype` (no fp32 buffer, no scatter)
                    one_hot = (vocab_ids == safe[rows, None]).float()
                    grad = ((torch.exp(logits - lse[:, None]) - one_hot) * w[rows, None]).to(dtype)
                else:
                    # eager: in place in the logits' buffer, without further full-size temporaries
                    grad = logits.sub_(lse[:, None]).exp_()
                    grad.scatter_add_(1, safe[rows, None], torch.full_like(target_logit[:, None], -1.0))
                    grad = grad.mul_(w[rows, None]).to(dtype)
                grad_h[rows] = grad @ wc
                grad_w += (grad.T @ hc[rows]).float()
        ctx.save_for_backward(grad_h, grad_w, denominator)
        ctx.dtypes = (h.dtype, weight.dtype)
        ctx.mark_non_differentiable(losses)
        return total / denominator, losses

    @staticmethod
    def backward(ctx, grad_loss, grad_losses):  # noqa: ANN001, ANN205
        return *_stored_input_grads(ctx, grad_loss), None, None, None, None, None


def _stored_input_grads(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """The chunked losses' backward: the gradients their forward stored, scaled by the incoming one."""
    grad_h, grad_w, denominator = ctx.saved_tensors
    scale = grad_loss / denominator
    h_dtype, w_dtype = ctx.dtypes
    return (grad_h * scale).to(h_dtype), (grad_w * scale).to(w_dtype)


def chunked_distill_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    distill: DistillTargets,
    chunk_rows: int = LOSS_CHUNK_ROWS,
) -> torch.Tensor:
    """(1 - share) x the next-token cross-entropy + share x T^2 x the cross-entropy from the
    teachers' averaged softmax(logits / T) to the student's softmax(logits / T) (Hinton et al. 2015:
    T^2 keeps the soft part's gradients at the hard part's scale), mean over the valid targets.
    Neither the student's nor any teacher's full-vocabulary logits are held for the whole batch."""
    h = hidden.reshape(-1, hidden.size(-1))
    t = targets.reshape(-1)
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    teachers = [x.reshape(-1, x.size(-1)) for x in distill.hiddens]
    return _ChunkedDistillLoss.apply(
        h,
        weight,
        t,
        dtype,
        chunk_rows,
        distill.share,
        distill.temperature,
        len(teachers),
        *teachers,
        *distill.heads,
    )


class _ChunkedDistillLoss(torch.autograd.Function):
    """_ChunkedLMLoss with the teachers' distribution mixed into the targets: the loss and both
    input gradients in one pass over the chunks."""

    @staticmethod
    def forward(ctx, h, weight, targets, dtype, chunk_rows, share, temperature, n, *teacher):  # noqa: ANN001, ANN205
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            hiddens, heads = [x.to(dtype) for x in teacher[:n]], [x.to(dtype) for x in teacher[n:]]
            valid = targets != IGNORE_INDEX
            safe = torch.where(valid, targets, 0)
            w = valid.float()
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            vocab_ids = torch.arange(weight.size(0), device=h.device)
            grad_h = torch.empty_like(hc)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            T = temperature
            for start in range(0, h.size(0), chunk_rows):
                rows = slice(start, start + chunk_rows)
                logits = (hc[rows] @ wc.T).float()
                log_p = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
                log_q = logits / T - torch.logsumexp(logits / T, dim=-1, keepdim=True)
                soft = (
                    sum(
                        torch.softmax((x[rows] @ head.T).float() / T, dim=-1)
                        for x, head in zip(hiddens, heads, strict=True)
                    )
                    / n
                )
                one_hot = (vocab_ids == safe[rows, None]).float()
                hard_loss = -(log_p * one_hot).sum(-1)
                soft_loss = -(log_q * soft).sum(-1) * T * T
                total += (((1 - share) * hard_loss + share * soft_loss) * w[rows]).sum()
                grad = (1 - share) * (log_p.exp() - one_hot) + share * T * (log_q.exp() - soft)
                grad = (grad * w[rows, None]).to(dtype)
                grad_h[rows] = grad @ wc
                grad_w += (grad.T @ hc[rows]).float()
        denominator = w.sum()
        ctx.save_for_backward(grad_h, grad_w, denominator)
        ctx.dtypes = (h.dtype, weight.dtype)
        ctx.n_inputs = 8 + len(teacher)
        return total / denominator

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001, ANN205
        return *_stored_input_grads(ctx, grad_loss), *([None] * (ctx.n_inputs - 2))


class Decoder(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Transformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # train.activation_checkpointing: keep only each block's input for backward and recompute
        # the rest there, trading about a third more compute for activation memory
        self.activation_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        # Each block adds two outputs to the residual stream; shrinking the projections that write
        # into it by 1/sqrt(2 * layers) keeps the stream's variance from growing with depth (GPT-2).
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for block in self.model.layers:
            nn.init.normal_(block.self_attn.o_proj.weight, mean=0.0, std=out_std)
            nn.init.normal_(block.mlp.down_proj.weight, mean=0.0, std=out_std)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters counted once each (tied weights once); optionally without the token
        embedding and output matrices, the usual 'non-embedding' count of scaling laws."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.model.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        return_logits: bool = True,
        loss_weights: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        return_token_losses: bool = False,
        return_hidden: bool = False,
        distill: DistillTargets | None = None,
    ) -> DecoderOutput:
        """Logits [B, T, vocab] and, given targets, the mean next-token loss.

        targets[:, t] is the token that follows input_ids[:, t] (already shifted by the caller);
        positions holding -100 are ignored. position_ids ([T] or [B, T]) default to 0..T-1;
        attn_mask (bool, True = may attend, broadcastable to [B, 1, T, T]) replaces the causal mask.
        With targets and return_logits=False, logits is None and the loss comes from
        chunked_lm_loss: the same value, faster, and without the full logits in memory.
        loss_weights (float, shaped like targets) turn the mean into a weighted sum over targets.
        cu_seqlens (int32 document offsets in the flattened batch, loader.document_bounds) keeps
        packed documents apart with variable-length flash attention instead of a mask: CUDA, bf16
        or fp16 only (see use_varlen_attention). return_token_losses adds each target's loss (with
        return_logits=False).
        Without targets, return_hidden gives the final hidden states instead of logits (a teacher's
        part of distillation); with targets, distill mixes in the loss to teachers' distribution.
        """
        T = input_ids.shape[1]
        if position_ids is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
            cos, sin = self.model.rope_cos[:T], self.model.rope_sin[:T]
        else:
            cos, sin = self.model.rope_cos[position_ids], self.model.rope_sin[position_ids]
            if cos.dim() == 3:  # [B, T, D] -> [B, 1, T, D], broadcast over heads
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

        x = self.model.embed_tokens(input_ids)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.model.layers:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(
                    block, x, cos, sin, attn_mask, cu_seqlens, use_reentrant=False
                )
            else:
                x = block(x, cos, sin, attn_mask, cu_seqlens)
        hidden = self.model.norm(x)
        if targets is None and return_hidden:
            return DecoderOutput(logits=None, loss=None, hidden=hidden)

        if targets is not None and not return_logits:
            # the training path: the loss without ever holding [B*T, vocab] logits
            if distill is not None:
                loss = chunked_distill_loss(hidden, self.lm_head.weight, targets, distill)
                return DecoderOutput(logits=None, loss=loss)
            out = chunked_lm_loss(
                hidden, self.lm_head.weight, targets, loss_weights, token_losses=return_token_losses
            )
            loss, losses = out if return_token_losses else (out, None)
            return DecoderOutput(logits=None, loss=loss, token_losses=losses)
        logits = self.lm_head(hidden)
        loss = None
        if targets is not None:
            # fp32 for the softmax: bf16 logits lose too much precision over a large vocabulary
            losses = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="none" if loss_weights is not None else "mean",
            )
            loss = losses if loss_weights is None else (losses * loss_weights.reshape(-1)).sum()
        return DecoderOutput(logits=logits, loss=loss)
