"""SVDiff's unmix regularisation for Cut-Mix training (Han et al. 2023): a subject's identifier should not
attend to the half of a cut-mixed image that shows the other subject.

For a mixed item with identifier tokens ``L`` (left subject) and ``R`` (right subject), every cross-attention
layer gives, per head, the attention of those tokens over the image positions; normalised over positions,
``m_L`` is the share of ``L``'s attention that falls on the right half and ``m_R`` the share of ``R``'s on the
left half. The term is ``mean over heads and layers of (m_L^2 + m_R^2) / 2``: zero when the attention is
separated, up to 1 when a token attends only to the wrong half. `UnmixAttnProcessor` computes the attention with
explicit probabilities (diffusers' `AttnProcessor` arithmetic) so that it can read them; `UnmixRecorder`
collects the terms of one forward pass.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch


class UnmixRecorder:
    """Which batch entries are mixed (and their identifier tokens) for the current forward pass, and the terms
    the cross-attention layers add."""

    def __init__(self):
        self.entries: List[Tuple[int, List[int], List[int]]] = []
        self.latent_hw: Tuple[int, int] = (1, 1)
        self.terms: List[torch.Tensor] = []

    def begin(self, entries: Sequence[Tuple[int, List[int], List[int]]], latent_hw: Tuple[int, int]) -> None:
        self.entries, self.latent_hw, self.terms = list(entries), latent_hw, []

    def end(self) -> Optional[torch.Tensor]:
        """The mean term of this forward pass (None when nothing was mixed)."""
        loss = torch.stack(self.terms).mean() if self.terms else None
        self.entries, self.terms = [], []
        return loss

    def record(self, probs: torch.Tensor, heads: int) -> None:
        """probs (batch * heads, positions, tokens) of one cross-attention layer."""
        if not self.entries:
            return
        bh, q, _ = probs.shape
        probs = probs.view(bh // heads, heads, q, -1)
        h0, w0 = self.latent_hw
        factor = math.sqrt(h0 * w0 / q)
        w = max(1, round(w0 / factor))  # the layer's width in positions
        right = (torch.arange(q, device=probs.device) % w) >= w / 2  # positions in the right half
        for b, left_tokens, right_tokens in self.entries:
            terms = []
            for tokens, wrong in ((left_tokens, right), (right_tokens, ~right)):
                attention = probs[b, :, :, tokens].sum(-1)  # (heads, positions)
                share = (attention * wrong).sum(-1) / attention.sum(-1).clamp_min(1e-12)
                terms.append(share.pow(2).mean())
            self.terms.append(torch.stack(terms).mean())


class UnmixAttnProcessor:
    """Cross-attention with explicit probabilities, reporting them to an `UnmixRecorder`."""

    def __init__(self, recorder: UnmixRecorder):
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.recorder.record(probs, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install(unet, recorder: UnmixRecorder) -> int:
    """`UnmixAttnProcessor` on every cross-attention (``attn2``) module of ``unet``; returns how many."""
    count = 0
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "set_processor"):
            module.set_processor(UnmixAttnProcessor(recorder))
            count += 1
    return count


def identifier_positions(tokenizer, prompt: str, word: str) -> List[int]:
    """Positions of ``word``'s tokens in ``prompt``'s padded input ids (its first occurrence)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    target = tokenizer(word, add_special_tokens=False).input_ids
    for start in range(len(ids) - len(target) + 1):
        if ids[start:start + len(target)] == target:
            return list(range(start, start + len(target)))
    raise ValueError(f"identifier {word!r} does not occur in the prompt {prompt!r}")
