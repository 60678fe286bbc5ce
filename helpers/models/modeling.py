"""Model construction: Phi LMs, CLIP vision towers and their LLaVA-style assembly.

The assistant is a stock ``LlavaForConditionalGeneration``: CLIP vision tower -> 2-layer GELU projector
(``mlp2x_gelu``) -> Phi language model. Saved with ``save_pretrained`` it reloads with plain transformers
(``AutoModelForImageTextToText`` / ``LlavaForConditionalGeneration`` + ``AutoProcessor``), and vLLM or
llama.cpp's converter understand the layout.
"""
from __future__ import annotations

import math

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PhiConfig,
    PhiForCausalLM,
)

from helpers.data.tokenizer import image_token_id


def phi_config(spec, tok) -> PhiConfig:
    if spec.vocab_size < len(tok):
        raise ValueError(f"vocab_size {spec.vocab_size} is smaller than the tokenizer ({len(tok)} tokens)")
    return PhiConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        partial_rotary_factor=spec.partial_rotary_factor,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def new_phi_lm(spec, tok, seed: int = 0) -> PhiForCausalLM:
    torch.manual_seed(seed)
    return PhiForCausalLM(phi_config(spec, tok))


def clip_vision_config(spec) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                            num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                            image_size=spec.image_size, patch_size=spec.patch_size,
                            projection_dim=spec.projection_dim)


def new_clip(spec, tok, max_text_length: int, seed: int = 0) -> CLIPModel:
    """A small CLIP (text + vision towers) to be trained contrastively in the tiny profile."""
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=2, num_attention_heads=spec.num_attention_heads,
                max_position_embeddings=max_text_length, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, projection_dim=spec.projection_dim)
    config = CLIPConfig(text_config=text, vision_config=clip_vision_config(spec).to_dict(),
                        projection_dim=spec.projection_dim)
    return CLIPModel(config)


def vision_tower_from_clip(clip: CLIPModel) -> CLIPVisionModel:
    tower = CLIPVisionModel(clip.config.vision_config)
    tower.load_state_dict(clip.vision_model.state_dict())
    return tower


def image_processor(spec) -> CLIPImageProcessor:
    """CLIP's preprocessing (resize, centre crop, CLIP mean/std) at the profile's resolution."""
    return CLIPImageProcessor(size={"shortest_edge": spec.image_size},
                              crop_size={"height": spec.image_size, "width": spec.image_size})


def make_processor(tok, spec) -> LlavaProcessor:
    return LlavaProcessor(image_processor=image_processor(spec), tokenizer=tok, patch_size=spec.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=tok.chat_template)


FOLD_TARGETS = (None, 32.0, 128.0, 512.0)  # |k| the fold may shift to (None: fold as it is), see below


def _fold(weight, bias, gamma, beta, target):
    """(folded head weight, final-LayerNorm bias) for one target |k| (None: keep beta)."""
    u = 1.0 / gamma
    k = float((beta * u).sum())
    s = 0.0
    if target is not None and abs(k) < target:
        s = (math.copysign(target, k if k else 1.0) - k) / float(u.numel())  # beta' = beta + s * gamma
    beta2 = beta + s * gamma
    k2 = float((beta2 * u).sum())
    if abs(k2) < 1e-9:
        return None
    a = (bias - s * (weight @ gamma)) / k2
    return weight + torch.outer(a, u), beta2


def _head_error(weight, bias, gamma, beta, reference, z, dtype=torch.bfloat16) -> float:
    """Largest |logit error| of the head computed in `dtype` (inputs and weights rounded to it, fp32 accumulation)
    against `reference`."""
    h = (z.to(dtype) * gamma.to(dtype) + beta.to(dtype)).float()
    logits = h @ weight.to(dtype).float().T
    if bias is not None:
        logits = logits + bias.to(dtype).float()
    return float((logits.double() - reference).abs().max())


def fold_lm_head_bias(lm: PhiForCausalLM, probe_rows: int = 2048, probe_tokens: int = 32,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi's LM head has a bias, LLaVA's has none: fold the bias into the head's weight, exactly.

    After the final LayerNorm, h = gamma * z + beta with sum(z) = 0 for every token, so with u = 1 / gamma the
    product <u, h> = sum(beta / gamma) = k is the same for every token and W h + b = (W + b u^T / k) h. When |k| is
    small the added term is large and rounding the folded weight to bf16 costs accuracy (measured: 10x the error
    of the unfolded bf16 head at |k| ~ 1 with Phi-2-sized statistics). Only the head reads the final LayerNorm's
    output, so its bias may move along gamma: beta' = beta + s * gamma gives k' = k + s * d, and with
    a = (b - s W gamma) / k' the head W + a u^T still gives exactly W h + b on h' = h + s * gamma.

    The shift is chosen among :data:`FOLD_TARGETS` by the bf16 logit error on random normalised inputs and a sample
    of the vocabulary (fp64 reference; bf16 is the coarsest dtype the model may run in); the fold is refused if it is
    clearly worse than the unfolded head *in the head's own dtype* (an fp32 head, the tiny profile on a CPU, is
    judged in fp32: a bf16-only shortfall once stopped a tiny run whose head never runs in bf16) and beyond that
    dtype's rounding of the largest logit. Returns (head weight in the LM head's dtype, final-LayerNorm bias in its
    dtype).
    """
    norm = lm.model.final_layernorm
    gamma, beta = norm.weight.detach().double().cpu(), norm.bias.detach().double().cpu()
    weight, bias = lm.lm_head.weight.detach(), lm.lm_head.bias.detach()
    out_dtypes = (weight.dtype, norm.bias.dtype)
    if bias.abs().max() == 0:
        return weight.clone(), norm.bias.detach().clone()
    if gamma.abs().min() < 1e-4:
        raise ValueError("final LayerNorm has (near-)zero gains: the LM head bias cannot be folded safely")
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(weight.shape[0], generator=g)[:probe_rows]
    w_probe, b_probe = weight[rows].double().cpu(), bias[rows].double().cpu()
    z = torch.randn(probe_tokens, gamma.numel(), generator=g, dtype=torch.float64)
    z = (z - z.mean(-1, keepdim=True)) / z.std(-1, keepdim=True, unbiased=False)
    reference = (z * gamma + beta) @ w_probe.T + b_probe
    best = None
    for target in FOLD_TARGETS:
        folded = _fold(w_probe, b_probe, gamma, beta, target)
        if folded is not None:
            err = _head_error(folded[0], None, gamma, folded[1], reference, z)
            if best is None or err < best[0]:
                best = (err, target, folded)
    run_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float32
    error = _head_error(best[2][0], None, gamma, best[2][1], reference, z, run_dtype) if best else float("inf")
    unfolded = _head_error(w_probe, b_probe, gamma, beta, reference, z, run_dtype)
    # an error within the dtype's own rounding of the largest logit is no loss (a tiny LM's bf16 head: 0.06)
    rounding = torch.finfo(run_dtype).eps / 2 * float(reference.abs().max())
    if error > max(1.5 * unfolded, rounding) + 1e-3:  # 1e-3 of a logit: nothing (fp32 errors are 1e-6 to 1e-4)
        raise ValueError(f"the LM head bias cannot be folded without losing {run_dtype} accuracy (folded error "
                         f"{error:.3g} vs {unfolded:.3g} unfolded)")
    work = torch.float64 if weight.numel() <= 2 ** 26 else torch.float32  # Phi-2's head: fp32 (0.5 GB, not 1 GB)
    full_weight, new_beta = _fold(weight.to(work), bias.to(work), gamma.to(weight.device, work),
                                  beta.to(weight.device, work), best[1])
    return full_weight.to(out_dtypes[0]), new_beta.to(out_dtypes[1])


def llava_config(lm_config: PhiConfig, vision_config: CLIPVisionConfig, tok, profile) -> LlavaConfig:
    return LlavaConfig(vision_config=vision_config, text_config=lm_config,
                       image_token_id=image_token_id(tok), image_seq_length=profile.image_seq_length,
                       projector_hidden_act="gelu", vision_feature_select_strategy="default",
                       vision_feature_layer=profile.vision_feature_layer, multimodal_projector_bias=True,
                       tie_word_embeddings=False)


def assemble_llava(lm: PhiForCausalLM, tower: CLIPVisionModel, tok, profile, seed: int = 0):
    """A LlavaForConditionalGeneration made of `tower`, a fresh full-precision projector and `lm`.

    The shell is built on the meta device and the real parts are moved in, so a Phi-2-sized model is never
    held twice in memory.
    """
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = llava_config(lm.config, tower.config, tok, profile)
    config.text_config.pad_token_id = tok.pad_token_id
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = lm.model
    torch.manual_seed(seed)
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).float()
    head = torch.nn.Linear(lm.config.hidden_size, lm.config.vocab_size, bias=False,
                           dtype=lm.lm_head.weight.dtype, device=lm.lm_head.weight.device)
    weight, norm_bias = fold_lm_head_bias(lm)
    with torch.no_grad():
        head.weight.copy_(weight)
        lm.model.final_layernorm.bias.copy_(norm_bias)  # the fold may move it (see fold_lm_head_bias)
    model.lm_head = head
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise RuntimeError(f"parts of the assembled model were not filled in: {leftovers[:5]}")
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


@torch.no_grad()
def vision_features(tower: CLIPVisionModel, pixel_values: torch.Tensor, layer: int = -2) -> torch.Tensor:
    """What LLaVA feeds its projector: hidden states of `layer` with the CLS token dropped."""
    out = tower(pixel_values=pixel_values, output_hidden_states=True)
    return out.hidden_states[layer][:, 1:]
