"""The full profile is the real thing: Phi-2 + CLIP ViT-B/32 + LLaVA projector, checked at full size on the meta
device (no memory, no download) with the very config functions the course uses."""
from __future__ import annotations

import types

import pytest
import torch
from transformers import CLIPVisionModel, LlavaForConditionalGeneration, PhiForCausalLM

from helpers.config import FULL
from helpers.models.modeling import clip_vision_config, llava_config, phi_config
from helpers.planning.memory_plan import StandInTokenizer

PHI2_PARAMETERS = 2_779_683_840  # microsoft/phi-2 (PhiForCausalLM, LM head with bias)
CLIP_B32_VISION_PARAMETERS = 87_456_000  # openai/clip-vit-base-patch32 vision half (CLIPVisionModel)


@pytest.fixture(scope="module")
def tok():
    tok = StandInTokenizer.for_profile(FULL)
    # Phi-2's tokenizer: 50,295 tokens incl. added ones, <|endoftext|> = 50256 for BOS/EOS/PAD; <image> appended
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (50296, 50256, 50256, 50256)
    assert tok.convert_tokens_to_ids("<image>") == 50295
    return tok


@pytest.fixture(scope="module")
def configs(tok):
    lm_config = phi_config(FULL.phi, tok)
    vision_config = clip_vision_config(FULL.vision)
    return lm_config, vision_config, llava_config(lm_config, vision_config, tok, FULL)


def test_full_configs_are_phi2_and_clip_vit_b32(configs):
    lm, vision, llava = configs
    assert (lm.hidden_size, lm.num_hidden_layers, lm.num_attention_heads, lm.intermediate_size) == (2560, 32, 32, 10240)
    assert (lm.vocab_size, lm.max_position_embeddings) == (51200, 2048)
    # partial rotary 0.4 (PhiConfig's default is 0.5); transformers 5 keeps it with the RoPE parameters
    assert lm.rope_parameters["partial_rotary_factor"] == 0.4 and lm.rope_parameters["rope_theta"] == 10000.0
    assert (lm.hidden_act, lm.layer_norm_eps, lm.tie_word_embeddings) == ("gelu_new", 1e-5, False)
    assert (lm.bos_token_id, lm.eos_token_id, lm.pad_token_id) == (50256, 50256, 50256)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (768, 12, 12)
    assert (vision.intermediate_size, vision.image_size, vision.patch_size) == (3072, 224, 32)
    assert vision.hidden_act == "quick_gelu"
    assert FULL.image_seq_length == (224 // 32) ** 2 == 49
    assert (llava.image_seq_length, llava.image_token_id) == (49, 50295)
    assert (llava.vision_feature_layer, llava.vision_feature_select_strategy) == (-2, "default")
    assert llava.projector_hidden_act == "gelu" and llava.multimodal_projector_bias


def test_phi2_and_clip_on_meta_have_the_published_sizes(configs):
    lm_config, vision_config, _ = configs
    with torch.device("meta"):
        lm = PhiForCausalLM(lm_config)
        tower = CLIPVisionModel(vision_config)
    assert sum(p.numel() for p in lm.parameters()) == PHI2_PARAMETERS
    assert tuple(lm.lm_head.bias.shape) == (51200,)  # Phi's head has a bias (folded away in LLaVA)
    attention = lm.model.layers[0].self_attn
    assert attention.head_dim == 80 and attention.rotary_ndims == 32
    assert tuple(lm.model.rotary_emb.inv_freq.shape) == (16,)  # rotary on 32 of 80 dims per head
    assert sum(p.numel() for p in tower.parameters()) == CLIP_B32_VISION_PARAMETERS
    assert tuple(tower.embeddings.patch_embedding.weight.shape) == (768, 3, 32, 32)
    assert tuple(tower.embeddings.position_embedding.weight.shape) == (50, 768)  # 49 patches + CLS


def test_full_llava_every_shape_on_meta(configs, monkeypatch):
    _, _, config = configs
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    assert all(p.is_meta for p in model.parameters())
    llava = model.model
    proj = llava.multi_modal_projector
    assert tuple(proj.linear_1.weight.shape) == (2560, 768) and tuple(proj.linear_2.weight.shape) == (2560, 2560)
    assert tuple(model.lm_head.weight.shape) == (51200, 2560) and model.lm_head.bias is None
    assert tuple(llava.language_model.embed_tokens.weight.shape) == (51200, 2560)
    assert len(llava.language_model.layers) == 32 and len(llava.vision_tower.encoder.layers) == 12
    layer = llava.language_model.layers[0]
    assert tuple(layer.self_attn.q_proj.weight.shape) == (2560, 2560)
    assert tuple(layer.mlp.fc1.weight.shape) == (10240, 2560) and tuple(layer.mlp.fc2.weight.shape) == (2560, 10240)

    shapes = {}

    def record(name):
        def hook(module, args, output):
            shapes[name] = (tuple(args[0].shape) if args else None, output)
        return hook

    llava.vision_tower.register_forward_hook(record("vision"))
    proj.register_forward_hook(record("projector"))
    llava.language_model.register_forward_hook(record("llm"))
    # LlavaModel compares placeholder and feature counts with .item(), which meta tensors cannot answer; the mask
    # itself is the same. Likewise transformers' packed-sequence probe of the position ids.
    monkeypatch.setattr(llava, "get_placeholder_mask", types.MethodType(
        lambda self, input_ids, inputs_embeds, image_features:
        (input_ids == self.config.image_token_id).unsqueeze(-1).expand_as(inputs_embeds), llava))
    monkeypatch.setattr("transformers.masking_utils.find_packed_sequence_indices", lambda position_ids: None)

    batch, text = 2, 20
    with torch.device("meta"):
        ids = torch.zeros(batch, 49 + text, dtype=torch.long)
        ids[:, 1:50] = config.image_token_id
        pixels = torch.zeros(batch, 3, 224, 224)
    out = model(input_ids=ids, pixel_values=pixels, use_cache=False, output_hidden_states=True)

    vision_in, vision_out = shapes["vision"]
    assert vision_in == (batch, 3, 224, 224)
    assert tuple(vision_out.last_hidden_state.shape) == (batch, 50, 768)  # 49 patches + CLS
    assert len(vision_out.hidden_states) == 13  # embeddings + 12 layers; LLaVA takes [-2]
    proj_in, proj_out = shapes["projector"]
    assert proj_in == (batch, 49, 768)  # CLS dropped ("default" strategy)
    assert tuple(proj_out.shape) == (batch, 49, 2560)
    image_states = out.image_hidden_states  # one tensor (transformers <= 5.23) or one per image (5.24)
    image_states = torch.cat(list(image_states)) if isinstance(image_states, (list, tuple)) else image_states
    assert tuple(image_states.reshape(-1, 2560).shape) == (batch * 49, 2560)
    assert tuple(shapes["llm"][1].last_hidden_state.shape) == (batch, 49 + text, 2560)
    assert len(out.hidden_states) == 33
    assert tuple(out.logits.shape) == (batch, 49 + text, 51200)


@pytest.mark.parametrize("spec_name", ["phi", "pretrain_phi"])
def test_every_phi_of_both_profiles_runs_a_forward(spec_name):
    """Every Phi a profile builds runs (partial rotary needs an even number of rotated dimensions per head: the full
    profile's stage-01 model once had 64-dim heads, 25 rotated dimensions, and crashed at its first forward)."""
    from transformers import PhiForCausalLM

    from helpers.config import FULL, TINY
    from helpers.models.modeling import phi_config
    from helpers.planning.memory_plan import StandInTokenizer

    for profile in (TINY, FULL):
        spec = getattr(profile, spec_name)
        config = phi_config(spec, StandInTokenizer.for_profile(profile))
        with torch.device("meta"):
            model = PhiForCausalLM(config)
            out = model(input_ids=torch.zeros(1, 8, dtype=torch.long))
        assert tuple(out.logits.shape) == (1, 8, spec.vocab_size)
