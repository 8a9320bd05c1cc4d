"""CLIP's text and image towers, opened up so prompt tokens can be spliced in. [ours]

transformers 5's `CLIPTextModel.forward` takes no `inputs_embeds`, so the text path goes through
the submodules: token embeddings (with the context vectors spliced in) -> `embeddings(inputs_embeds)`
(adds positions) -> each encoder layer under an explicit additive causal mask -> final layer norm ->
the hidden state at the EOS position -> `text_projection`. The causal mask must really be applied:
transformers' own path may hand SDPA no mask and an `is_causal` flag instead, which a layer-by-layer
call would not get. Sequences are truncated to the longest EOS position of the batch: under a causal
mask nothing before the EOS sees what follows it, so the features are the same and the work shrinks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask [1, 1, L, L]: 0 on and below the diagonal, the dtype's minimum above it."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.triu(1)[None, None]


def encode_text_embeds(clip, embeds: torch.Tensor, eos: torch.Tensor, truncate: bool = True) -> torch.Tensor:
    """Token embeddings [N, L, D] with EOS positions [N] -> projected text features [N, E] (not normalised)."""
    tm = clip.text_model
    if truncate:
        length = int(eos.max()) + 1
        embeds = embeds[:, :length]  # [N, L, D] -> [N, L', D]
    h = tm.embeddings(inputs_embeds=embeds)
    mask = causal_mask(h.shape[1], h.dtype, h.device)
    for layer in tm.encoder.layers:
        h = layer(h, mask)
    h = tm.final_layer_norm(h)
    pooled = h[torch.arange(h.shape[0], device=h.device), eos]  # [N, D]
    return clip.text_projection(pooled)


def encode_image_prompted(clip, pixel_values: torch.Tensor, prompts: torch.Tensor | None,
                          deep: bool = False) -> torch.Tensor:
    """Pixels [N, 3, H, W] with visual prompt tokens -> projected image features [N, E] (not normalised).

    Args:
        prompts: None, or [1, P, D] (shallow: inserted after the class token before the first layer),
            or [layers, P, D] with `deep=True` (layer i's input has its prompt slice replaced by
            prompts[i], as VPT-deep does).
    """
    vm = clip.vision_model
    h = vm.embeddings(pixel_values)  # [N, 1 + patches, D]
    n_prompt = 0 if prompts is None else prompts.shape[1]
    if n_prompt:
        p0 = prompts[0].to(h.dtype).expand(h.shape[0], -1, -1)
        h = torch.cat([h[:, :1], p0, h[:, 1:]], dim=1)  # [N, 1 + P + patches, D]
    h = vm.pre_layrnorm(h)
    for i, layer in enumerate(vm.encoder.layers):
        if n_prompt and deep and i > 0:
            pi = prompts[i].to(h.dtype).expand(h.shape[0], -1, -1)
            h = torch.cat([h[:, :1], pi, h[:, 1 + n_prompt:]], dim=1)
        h = layer(h, None)
    pooled = vm.post_layernorm(h[:, 0])
    return clip.visual_projection(pooled)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows, in float32 (float64 stays float64, for gradient checks)."""
    return F.normalize(x if x.dtype == torch.float64 else x.float(), dim=-1)
