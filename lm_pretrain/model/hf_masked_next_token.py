"""The masked next-token view of an lmp decoder, for transformers' AutoModelForMaskedLM.

lmp copies this file into every exported model trained with masked next-token prediction (as
modeling_lmp.py, registered under "auto_map" in config.json), so that the BabyLM pipeline's mlm and
mntp backends load the model with AutoModelForMaskedLM(trust_remote_code=True), exactly as they load
GPT-BERT. The weights are the plain Llama ones: AutoModelForCausalLM still loads the same folder
as a LlamaForCausalLM. This file must import nothing but torch and transformers (4.51 and 5.x).
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM
from transformers.modeling_outputs import MaskedLMOutput


class LmpForMaskedNextToken(LlamaForCausalLM):
    """The Llama stack with full (bidirectional) attention over the non-padding tokens.

    logits[:, k] predict token k + 1, as in training: score a masked token at position j by reading
    the output at j - 1 (the official pipeline's mntp backend does exactly that).
    """

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
        **kwargs: object,
    ) -> MaskedLMOutput:
        """logits [B, T, vocab]; with logits_at ([B] positions) only row b's logits at position
        logits_at[b], [B, vocab], which is all that scoring one masked token per row needs."""
        hidden = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden.shape[:2]
        keep = (
            torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
            if attention_mask is None
            else attention_mask.bool()
        )
        # an additive [B, 1, T, T] mask: 0 where a key may be seen, the minimum where it is padding.
        # Given a 4-D mask, Llama's attention (eager and SDPA, 4.51 and 5.x) applies it as it is,
        # with no causal part added.
        mask = torch.zeros(batch, 1, length, length, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~keep[:, None, None, :], torch.finfo(hidden.dtype).min)
        positions = torch.arange(length, device=hidden.device).unsqueeze(0).expand(batch, -1)
        rotary = self.model.rotary_emb(hidden, positions)
        for layer in self.model.layers:
            out = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
            hidden = out[0] if isinstance(out, tuple) else out  # 4.51 returns a tuple, 5.x a tensor
        if logits_at is not None:
            hidden = hidden[torch.arange(batch, device=hidden.device), logits_at]
        logits = self.lm_head(self.model.norm(hidden))
        return MaskedLMOutput(logits=logits)
