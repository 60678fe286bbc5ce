"""Learning actually happens: short real training runs whose loss must fall (a broken pipeline fails these)."""
import dataclasses

import torch

from helpers.config import Paths, StageSpec


def test_pretraining_lowers_heldout_loss(tok, world, profile, tmp_path):
    from helpers.pretrain import mean_loss, pretrain, read_corpus

    quick = dataclasses.replace(profile, pretrain=StageSpec(learning_rate=3e-3, batch_size=16, max_steps=40,
                                                             logging_steps=10))
    trainer, model, heldout, initial = pretrain(quick, Paths(quick, tmp_path), tok, read_corpus(world.corpus))
    final = mean_loss(model, heldout)
    assert final < initial - 1.0, (initial, final)


def test_projector_only_training_changes_only_the_projector_and_lowers_loss(saved_llava, world, tok, profile,
                                                                            tmp_path):
    from transformers import LlavaForConditionalGeneration

    from helpers.multimodal_data import read_coco_captions
    from helpers.modeling import freeze
    from helpers.projection import feature_table, make_dataset, mean_conversation_loss, train_projector

    model = LlavaForConditionalGeneration.from_pretrained(saved_llava)
    freeze(model)
    model.model.multi_modal_projector.requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records, _ = read_coco_captions(world.captions("train"), world.images("train"))
    from helpers.modeling import image_processor

    feats, index = feature_table(model.model.vision_tower, image_processor(profile.vision), records, -2,
                                 tmp_path / "feats")
    ds = make_dataset(records, tok, profile, feats, index, profile.projection)
    initial = mean_conversation_loss(model, ds, tok)
    quick = dataclasses.replace(profile, projection=StageSpec(learning_rate=1e-2, batch_size=16, max_steps=15,
                                                               logging_steps=5))
    train_projector(model, ds, tok, quick, Paths(quick, tmp_path))
    final = mean_conversation_loss(model, ds, tok)
    assert final < initial
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)
