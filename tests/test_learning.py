"""Learning actually happens: short real training runs whose loss must fall (a broken pipeline fails these)."""
import dataclasses

import torch

from helpers.config import Paths, StageSpec


def test_pretraining_lowers_heldout_loss(tok, world, profile, tmp_path):
    """Notebook 01's own cells: blocks, PhiConfig model, trainer, training."""
    from helpers.course import run_cells
    from helpers.train.pretrain import mean_loss, read_corpus

    quick = dataclasses.replace(profile, pretrain=StageSpec(learning_rate=3e-3, batch_size=16, max_steps=40,
                                                             logging_steps=10))
    cells = run_cells("01_pretrain_phi", ["blocks", "model", "trainer", "train"], profile=quick,
                      paths=Paths(quick, tmp_path), tok=tok, documents=read_corpus(world.corpus), SAVE_STEPS=None,
                      RESUME=False)
    final = mean_loss(cells["model"], cells["heldout"])
    assert final < cells["initial"] - 1.0, (cells["initial"], final)


def test_projector_only_training_changes_only_the_projector_and_lowers_loss(saved_llava, world, tok, profile,
                                                                            tmp_path):
    """Notebook 02's own cells after the model is assembled: freezing, cached features, trainer, training."""
    from transformers import LlavaForConditionalGeneration

    from helpers.course import run_cells
    from helpers.data.multimodal_data import read_coco_captions
    from helpers.models.modeling import image_processor
    from helpers.train.projection import mean_conversation_loss

    model = LlavaForConditionalGeneration.from_pretrained(saved_llava)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records, _ = read_coco_captions(world.captions("train"), world.images("train"))
    quick = dataclasses.replace(profile, projection=StageSpec(learning_rate=1e-2, batch_size=16, max_steps=15,
                                                               logging_steps=5))
    cells = run_cells("02_projection", ["freeze", "features", "trainer", "train"], model=model, profile=quick,
                      paths=Paths(quick, tmp_path), tok=tok, image_proc=image_processor(profile.vision),
                      train_records=records, val_records=records, SAVE_STEPS=None, RESUME=False)
    initial = cells["initial"]
    final = mean_conversation_loss(model, cells["dataset"], tok)
    assert final < initial
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)
