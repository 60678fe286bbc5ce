"""Shared fixtures: a miniature synthetic world, its tokenizer and a random tiny LLaVA (built in seconds)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers.config import TINY, WorldSpec
from helpers.data.tokenizer import train_bpe_tokenizer
from helpers.data.world import build_world

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

    from helpers.models.modeling import assemble_llava, clip_vision_config, new_phi_lm

    lm = new_phi_lm(profile.phi, tok, seed=1)
    with torch.no_grad():
        lm.lm_head.bias.normal_(0, 0.5)
        lm.model.final_layernorm.bias.normal_(0, 0.5)
    torch.manual_seed(2)
    tower = CLIPVisionModel(clip_vision_config(profile.vision))
    return assemble_llava(lm, tower, tok, profile, seed=3).eval()


@pytest.fixture(scope="session")
def processor(tok, profile):
    from helpers.models.modeling import make_processor

    return make_processor(tok, profile.vision)


@pytest.fixture(scope="session")
def saved_llava(llava, processor, tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    llava.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def qlora_model(checkpoint, profile):
    """The course's 4-bit nf4 LLaVA with LoRA adapters, built by notebook 03's own "load-4bit" and "lora" cells."""
    from helpers.course import run_cells

    return run_cells("03_qlora_instruct", ["load-4bit", "lora"], checkpoint=checkpoint, profile=profile)["model"]


def four_bit_model(checkpoint):
    """Notebook 03's 4-bit model before its LoRA adapters (its "load-4bit" cell)."""
    from helpers.course import run_cells

    return run_cells("03_qlora_instruct", ["load-4bit"], checkpoint=checkpoint)["model"]


def train_qlora(model, dataset, tok, profile, paths, callbacks=None, resume=None, save_steps=None,
                length_balanced: bool = True, answer_only_loss: bool = True, **overrides):
    """Stage 03's trainer as notebook 03's "trainer" cell builds it, without its validation and sample callbacks,
    with switches for the comparisons of the trainer's own mechanics (the plain way: random micro-batches and the
    model's own loss over full logits)."""
    from helpers.data.encoding import PadCollator
    from helpers.train.training import CachedFeatureTrainer, train, training_arguments

    args = training_arguments(profile.instruct, paths.stage_dir("03_qlora_instruct") / "trainer", profile.seed,
                              n_examples=len(dataset), save_steps=save_steps, length_balanced=length_balanced,
                              **overrides)
    trainer = CachedFeatureTrainer(model=model, args=args, train_dataset=dataset,
                                   data_collator=PadCollator(tok.pad_token_id), callbacks=list(callbacks or []),
                                   projector_learning_rate=profile.projector_learning_rate,
                                   answer_only_loss=answer_only_loss)
    train(trainer, resume)
    return trainer
