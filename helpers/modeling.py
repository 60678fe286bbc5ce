"""Model construction: Phi LMs, CLIP vision towers and their LLaVA-style assembly.

The assistant is a stock ``LlavaForConditionalGeneration``: CLIP vision tower -> 2-layer GELU projector
(``mlp2x_gelu``) -> Phi language model. Saved with ``save_pretrained`` it reloads with plain transformers
(``AutoModelForImageTextToText`` / ``LlavaForConditionalGeneration`` + ``AutoProcessor``), and vLLM or
llama.cpp's converter understand the layout.
"""
from __future__ import annotations

import torch
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModel,
                          LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PhiConfig, PhiForCausalLM)

from .tokenizer import image_token_id


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


def fold_lm_head_bias(lm: PhiForCausalLM) -> torch.Tensor:
    """Phi's LM head has a bias, LLaVA's has none. Fold the bias into the weight exactly.

    After the final LayerNorm, h = gamma * z + beta with sum(z) = 0 for every input, so with u = 1 / gamma
    the product <u, h> = sum(beta / gamma) = k is the same constant for every token. Hence
    W h + b = (W + b u^T / k) h. Raises if k is too small for this to be numerically safe.
    """
    norm = lm.model.final_layernorm
    gamma, beta = norm.weight.detach().double(), norm.bias.detach().double()
    weight, bias = lm.lm_head.weight.detach().double(), lm.lm_head.bias.detach().double()
    if bias.abs().max() == 0:
        return weight.to(lm.lm_head.weight.dtype)
    if gamma.abs().min() < 1e-4:
        raise ValueError("final LayerNorm has (near-)zero gains: the LM head bias cannot be folded safely")
    u = 1.0 / gamma
    k = float((beta * u).sum())
    if abs(k) < 1e-3 * float(u.norm()) * float(beta.norm() + 1e-12) and abs(k) < 1e-2:
        raise ValueError(f"sum(beta/gamma) = {k:.2e} is too close to 0 to fold the LM head bias")
    return (weight + torch.outer(bias, u) / k).to(lm.lm_head.weight.dtype)


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
    with torch.no_grad():
        head.weight.copy_(fold_lm_head_bias(lm))
    model.lm_head = head
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise RuntimeError(f"parts of the assembled model were not filled in: {leftovers[:5]}")
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@torch.no_grad()
def vision_features(tower: CLIPVisionModel, pixel_values: torch.Tensor, layer: int = -2) -> torch.Tensor:
    """What LLaVA feeds its projector: hidden states of `layer` with the CLS token dropped."""
    out = tower(pixel_values=pixel_values, output_hidden_states=True)
    return out.hidden_states[layer][:, 1:]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
