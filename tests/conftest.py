"""Shared fixtures: a miniature synthetic world, its tokenizer and a random tiny LLaVA (built in seconds)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers.config import TINY, WorldSpec
from helpers.tokenizer import train_bpe_tokenizer
from helpers.world import build_world

SMALL_WORLD = WorldSpec(world_seed=7, n_train_images=48, n_heldout_images=12, n_corpus_scenes=400)


@pytest.fixture(scope="session")
def profile():
    return dataclasses.replace(TINY, world=SMALL_WORLD)


@pytest.fixture(scope="session")
def world(tmp_path_factory, profile):
    return build_world(tmp_path_factory.mktemp("world"), profile.world, progress=False)


@pytest.fixture(scope="session")
def tok(world, tmp_path_factory):
    return train_bpe_tokenizer(world.corpus, 400, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def llava(tok, profile):
    """A random tiny LLaVA (Phi + CLIP ViT) with a non-trivial LM-head bias, as stage 02 would assemble it."""
    from transformers import CLIPVisionModel

    from helpers.modeling import assemble_llava, clip_vision_config, new_phi_lm

    lm = new_phi_lm(profile.phi, tok, seed=1)
    with torch.no_grad():
        lm.lm_head.bias.normal_(0, 0.5)
        lm.model.final_layernorm.bias.normal_(0, 0.5)
    torch.manual_seed(2)
    tower = CLIPVisionModel(clip_vision_config(profile.vision))
    return assemble_llava(lm, tower, tok, profile, seed=3).eval()


@pytest.fixture(scope="session")
def processor(tok, profile):
    from helpers.modeling import make_processor

    return make_processor(tok, profile.vision)


@pytest.fixture(scope="session")
def saved_llava(llava, processor, tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    llava.save_pretrained(path)
    processor.save_pretrained(path)
    return path
