"""The attention processor of Prompt-to-Prompt control, installed in every attention layer of a UNet.

``ControlledAttnProcessor.__call__`` is adapted from diffusers' ``AttnProcessor2_0``
(``diffusers/models/attention_processor.py``, diffusers 0.42.1): the same steps in the same order,
with three changes. Where the shared ``AttentionControl`` controls or records a layer at this step,
the conditional half of the batch gets explicit probabilities, which the control records and
replaces; the fused attention is given ``attn.scale`` (diffusers leaves it to the default
``1/sqrt(head_dim)``, which differs from it only in a model that sets its own); and a batch other
than ``[uncond, cond]`` of the control's rows is refused. Compare it with that
version when diffusers moves. The reference (google/prompt-to-prompt) patches
``CrossAttention.forward`` instead, in ``ptp_utils.register_attention_control``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from pipeline.engine.attention import AttentionControl


class ControlledAttnProcessor:
    """A diffusers attention processor for Prompt-to-Prompt (Hertz et al. 2023; the reference
    patches ``CrossAttention.forward`` in ``ptp_utils.register_attention_control``).

    It computes what ``AttnProcessor2_0`` does, with the fused ``scaled_dot_product_attention``,
    except where ``control`` controls or records the layer at this step: there the conditional half
    gets explicit probabilities (``Attention.get_attention_scores``, as ``AttnProcessor``), which
    ``control`` records and replaces; the unconditional half stays fused and untouched.
    """

    def __init__(self, control: AttentionControl, place: str = "down"):
        self.control = control
        self.place = place  # down, mid or up: the UNet part of the layers it serves

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if batch != 2 * self.control.rows:
            raise RuntimeError(
                f"attention control expects the UNet batch [uncond, cond] of 2 x {self.control.rows} rows, "
                f"got {batch}"
            )
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if not is_cross:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.control.controls(is_cross, query.shape[2], self.place):
            half = batch // 2
            masks = (None, None) if attention_mask is None else (attention_mask[:half], attention_mask[half:])
            uncond = F.scaled_dot_product_attention(
                query[:half], key[:half], value[:half], attn_mask=masks[0], scale=attn.scale
            )
            probs = self.attention_probabilities(attn, query[half:], key[half:], masks[1])
            probs = self.control.edit_attention(probs, is_cross, self.place)
            out = torch.cat([uncond, probs.to(value.dtype) @ value[half:]])
        else:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, scale=attn.scale
            )

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # linear projection, dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def attention_probabilities(attn, query: Tensor, key: Tensor, mask: Tensor | None) -> Tensor:
        """``softmax(Q K^T * scale + mask)`` as ``[B, H, Q, K]``, by diffusers' own
        ``get_attention_scores`` (its upcasting included)."""
        b, h, q, d = query.shape
        flat_mask = None if mask is None else mask.reshape(b * h, -1, mask.shape[-1])
        probs = attn.get_attention_scores(query.reshape(b * h, q, d), key.reshape(b * h, -1, d), flat_mask)
        return probs.view(b, h, q, -1)


def unet_place(processor_name: str) -> str:
    """``down``, ``mid`` or ``up``: where a diffusers attention processor's layer lies
    (``down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor`` is ``down``), as the
    reference's ``register_attention_control`` names them."""
    head = processor_name.split(".", 1)[0]
    places = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}
    if head not in places:
        raise ValueError(f"attention layer {processor_name!r} is in no down, mid or up block")
    return places[head]


@contextmanager
def attention_control(unet, control: AttentionControl) -> Iterator[AttentionControl]:
    """Install ``ControlledAttnProcessor`` in every attention layer of ``unet`` through diffusers'
    ``set_attn_processor``, each knowing its part of the UNet (``unet_place``), and restore the
    original processors afterwards, even on error."""
    original = dict(unet.attn_processors)
    processors = {place: ControlledAttnProcessor(control, place) for place in ("down", "mid", "up")}
    unet.set_attn_processor({name: processors[unet_place(name)] for name in original})
    try:
        yield control
    finally:
        unet.set_attn_processor(dict(original))  # set_attn_processor pops from the dict it is given
