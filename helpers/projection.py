"""Stage 02: frozen vision tower -> trainable projector -> frozen LLM, trained on image captions.

Because the vision tower is frozen, its features never change: they are computed once, cached in a safetensors
file and the projector trains from the cache (earlier attempts at this course ran CLIP at every step). The forward pass is
LLaVA's own: projected features are handed to ``LlavaForConditionalGeneration`` as ``mm_encoder_outputs``.
"""
from __future__ import annotations

import torch

from . import precision
from .encoding import PadCollator
from .modeling import assemble_llava, count_parameters, freeze
from .multimodal_data import ConversationDataset
from .sources import model_path
from .training import CachedFeatureTrainer, mean_target_loss, project_cached_features, train, training_arguments
from .vision import cache_features, load_vision_tower


def load_base_lm(profile, paths):
    from transformers import PhiForCausalLM

    if profile.llm_checkpoint:
        source = model_path(profile, "phi2")
    elif (paths.base_lm / "config.json").exists():
        source = paths.base_lm
    else:
        raise FileNotFoundError(f"No base LM at {paths.base_lm}: run 01_pretrain_phi.ipynb first "
                                "(or helpers.stages.ensure_base_lm).")
    policy = precision.current()  # frozen LLM in bf16 / fp16 on a GPU, fp32 on a CPU
    return PhiForCausalLM.from_pretrained(str(source), dtype=policy.dtype, attn_implementation=policy.attention,
                                          device_map=precision.device_map())


def build_projection_model(profile, paths, tok):
    """LLaVA assembled from the frozen base LM and vision tower; only the projector requires grad."""
    lm = load_base_lm(profile, paths)
    tower, processor = load_vision_tower(profile, paths)
    tower = tower.to(lm.device)
    model = assemble_llava(lm, tower, tok, profile, seed=profile.seed).to(lm.device)
    model.set_attn_implementation(precision.current().attention)
    freeze(model)
    model.model.multi_modal_projector.requires_grad_(True)
    if profile.checkpointing("projection"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    total, trainable = count_parameters(model)
    print(f"LLaVA model: {total:,} parameters, {trainable:,} trainable (projector only)")
    return model, processor


def feature_table(tower, processor, records, layer: int, cache_file):
    """Cached vision features for the distinct images of `records` and a path -> row index.

    Images that cannot be decoded are left out of the index (their records are then skipped and counted by
    ``ConversationDataset``)."""
    paths = list(dict.fromkeys(str(r.image) for r in records))
    unreadable = []
    features = cache_features(tower, processor, paths, layer, cache_file, unreadable=unreadable)
    bad = set(unreadable)
    return features, {p: i for i, p in enumerate(paths) if p not in bad}


def make_dataset(records, tok, profile, features, index, spec):
    return ConversationDataset(records, tok, profile.image_seq_length, spec.max_length, features, index)


def train_projector(model, dataset, tok, profile, paths, callbacks=None, resume=None, save_steps=None,
                    **overrides):
    """Train the projector; checkpoints (projector weights only) and `resume` as in ``helpers.training.train``."""
    args = training_arguments(profile.projection, paths.stage_dir("02_projection") / "trainer", profile.seed,
                              n_examples=len(dataset), save_steps=save_steps, **overrides)
    trainer = CachedFeatureTrainer(model=model, args=args, train_dataset=dataset,
                                   data_collator=PadCollator(tok.pad_token_id), callbacks=list(callbacks or []))
    train(trainer, resume)
    return trainer


def mean_conversation_loss(model, dataset, tok, batch_size: int = 64) -> float:
    """Answer-token-weighted loss on `dataset` through the cached-feature path."""
    collate = PadCollator(tok.pad_token_id)
    batches = (collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
               for i in range(0, len(dataset), batch_size))
    return mean_target_loss(model, batches, prepare=lambda m, batch: {
        "mm_encoder_outputs": project_cached_features(m, batch.pop("vision_features"))})
