"""The assistant learns to *look*: stages 02-03 (the very stage functions notebooks 02 and 03 run) on a small world,
then held-out questions asked twice, with the real image and with a blank one (the blind baseline). A model that
learned only the world's word frequencies answers as well blind; this one must answer far better with the image.

Catches (each checked by planting it): training conversations or captions paired with another image's features
(a shifted feature index, a cache keyed by the wrong image); features cached from another layer or processor than
the one that runs at inference; a projector or adapters that are not trained or not exported; an exported model
that never sees the image. Stage 01 is cut to a third of its steps, enough to read a colour or a count from a
description in words (with 120 steps it read colours at 29 % and the image types stayed low).
"""
from __future__ import annotations

import dataclasses

import pytest

from helpers import stages
from helpers.config import TINY, Paths

# questions whose answer is in the image alone; chance from the world's vocabulary: colour 1/4, shape 1/3, count 1/3
IMAGE_TYPES = ("colour", "shape", "count")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    world = dataclasses.replace(TINY.world, n_train_images=600, n_heldout_images=60, n_corpus_scenes=2000)
    profile = TINY.replace(world=world, n_eval_samples=60,
                           pretrain=dataclasses.replace(TINY.pretrain, max_steps=300),
                           instruct=dataclasses.replace(TINY.instruct, epochs=3.0))
    paths = Paths(profile, tmp_path_factory.mktemp("learning"))
    stages.pretrain_stage(profile, paths, resume=False)
    stages.vision_tower_stage(profile, paths, resume=False)
    stages.projection_stage(profile, paths, resume=False)
    return stages.instruct_stage(profile, paths, resume=False).metrics


def test_answers_about_images_are_read_from_the_image(trained):
    real, blind = trained["heldout_accuracy_by_type"], trained["blind_accuracy_by_type"]
    print({t: (round(real[t], 3), round(blind[t], 3)) for t in real})
    gaps = {t: real[t] - blind[t] for t in IMAGE_TYPES}
    assert real["colour"] >= 0.8 and gaps["colour"] >= 0.5, (real, blind)
    assert sum(gaps.values()) / len(gaps) >= 0.3, (real, blind)
    assert trained["export_check"]["relative"] <= trained["export_check"]["tolerance"]
