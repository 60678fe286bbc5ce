"""POPE without leakage, and POPE blind.

POPE asks about COCO val2014 images, most of which are also COCO train2017 images (hub_formats §12), which stage
02's captions and stage 03's LLaVA-Instruct conversations train on. The evaluated images are removed from both
training sets when they are read (``helpers.stages.drop_pope_images``), and POPE is also asked with blank images
(the blind baseline). Checked on the small stand-ins (POPE's stand-in shares most images with the train2017 one,
as the real sets do) and on a random tiny LLaVA.
"""
from __future__ import annotations

import dataclasses

import pytest

from helpers import stages
from helpers.config import FULL, Paths, with_settings
from helpers.data import hub_data
from rehearsal import standins as S


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins") / "small"
    return S.build_standins(root, "small", progress=False, log=lambda *a: None)


def full_profile(manifest, **settings):
    """The full profile on the local stand-ins (every training image and conversation, every POPE image asked)."""
    return with_settings(FULL, {**manifest["settings_local"], "n_train_samples": None, "n_eval_samples": 6,
                                "n_pope_questions": 72, **settings})


def record_ids(records) -> set[int]:
    return {hub_data.coco_image_id(r.image.name) for r in records}


def test_coco_image_id_reads_every_spelling():
    """Catches a parser that knows one spelling only (POPE's ``COCO_val2014_...`` or train2017's ``0000...jpg``),
    reads the digits of "val2014"/"train2017" as the id, or chokes on a path or a bare int: then the ids of the
    two sets never match and nothing is removed."""
    for name in ("COCO_val2014_000000310196", "COCO_val2014_000000310196.jpg", "000000310196.jpg",
                 "coco/train2017/000000310196.jpg", "/data/coco/train2017/000000310196.jpg", "310196", 310196):
        assert hub_data.coco_image_id(name) == 310196, name
    assert hub_data.coco_image_id("COCO_train2014_000000000009.jpg") == 9
    for name in ("", "cat.jpg", "COCO_val2014_.jpg", None, True):
        assert hub_data.coco_image_id(name) is None, name


def test_the_held_out_ids_are_exactly_the_images_pope_asks_about(standins, tmp_path):
    """Catches holding out other images than the evaluated ones: all of POPE's images (needlessly fewer training
    images), or the first n rows of the file instead of POPE's n // 3 per category (then some asked images are
    trained on)."""
    profile = full_profile(standins, n_pope_questions=12)
    questions = hub_data.pope_questions(profile, Paths(profile, tmp_path), 12)
    asked = {hub_data.coco_image_id(q["image"].name) for q in questions}
    assert hub_data.pope_image_ids(profile) == asked and len(asked) == 2
    assert len(hub_data.pope_image_ids(full_profile(standins))) == standins["counts"]["pope"]["images"] == 12


def test_no_evaluated_pope_image_is_in_a_training_split(standins, tmp_path):
    """Catches POPE leakage: the filter left out of stage 02 or stage 03, applied only when data is first prepared
    (so a cached preparation from before brings the images back: the second read below comes from that cache), or
    matching ids by file name across the two spellings (nothing would match). The prepared files do hold POPE's
    images (the stand-ins share them, as the real sets do), so without the filter this test fails."""
    profile = full_profile(standins)
    paths = Paths(profile, tmp_path)
    evaluated = hub_data.pope_image_ids(profile)
    assert standins["counts"]["pope"]["in_train2017"] == 9
    annotation_file, image_dir = hub_data.coco_caption_files(profile, paths, "train")
    json_file, llava_dir = hub_data.llava_instruct_files(profile, paths, "train")
    from helpers.data.multimodal_data import read_coco_captions, read_llava_instruct

    prepared_captions = read_coco_captions(annotation_file, image_dir)[0]
    prepared_conversations = read_llava_instruct(json_file, llava_dir)[0]
    leaked_captions = [r for r in prepared_captions if hub_data.coco_image_id(r.image.name) in evaluated]
    leaked_conversations = [r for r in prepared_conversations if hub_data.coco_image_id(r.image.name) in evaluated]
    assert leaked_captions and leaked_conversations  # what the filter has to remove
    for _ in range(2):  # freshly prepared above, then cached
        captions, report = stages.caption_records(profile, paths, "train")
        conversations, instruct_report = stages.instruct_records(profile, paths, "train")
        assert not record_ids(captions) & evaluated and not record_ids(conversations) & evaluated
        assert report.pope_heldout == {"evaluated_images": 12, "captions": len(leaked_captions),
                                       "images": len({r.image for r in leaked_captions})}
        assert instruct_report.pope_heldout == {"evaluated_images": 12, "conversations": len(leaked_conversations),
                                                "images": len({r.image for r in leaked_conversations})}
        assert len(captions) == len(prepared_captions) - len(leaked_captions) > 0
        assert len(conversations) == len(prepared_conversations) - len(leaked_conversations) > 0
    _, val_report = stages.caption_records(profile, paths, "val")  # held-out splits are not trained on: left alone
    assert val_report.pope_heldout == {}
    no_pope = dataclasses.replace(profile, n_pope_questions=0)
    assert len(stages.caption_records(no_pope, paths, "train")[0]) == len(prepared_captions)


@pytest.fixture()
def pope_questions_on_world(world):
    images = sorted(world.images("val").iterdir())[:4]
    return [{"question": f"Is there a {thing} in the image?", "answer": answer, "category": category,
             "image": path} for path, (thing, answer, category) in
            zip(images, [("circle", "yes", "random"), ("square", "no", "random"), ("star", "no", "popular"),
                         ("circle", "yes", "adversarial")])]


def test_blind_pope_asks_with_blank_images(llava, processor, pope_questions_on_world, monkeypatch):
    """Catches a blind baseline that is not blind: the flag ignored (the real images asked twice, so blind equals
    real and the gap reads 0) or the image dropped from the prompt (a different question); blind asks the same
    prompts with one-colour images of the same size."""
    from helpers.models import inference
    from helpers.scoring import evaluation

    seen = []
    real_generate = inference.generate_answers

    def spy(model, processor, images, prompts, **kwargs):
        seen.append((list(images), list(prompts)))
        return real_generate(model, processor, images, prompts, **kwargs)

    monkeypatch.setattr(evaluation, "generate_answers", spy)  # the name evaluation calls
    results = {}
    for blind in (False, True):
        seen.clear()
        results[blind] = evaluation.evaluate_pope(llava, processor, pope_questions_on_world, batch_size=2,
                                                  progress=False, blind=blind)
        results[blind]["seen"] = [pair for batch in seen for pair in zip(*batch)]
    real, blind = results[False]["seen"], results[True]["seen"]
    assert len(real) == len(blind) == 4
    assert [p for _, p in real] == [p for _, p in blind]  # the same prompts, "<image>" included
    assert all(all(lo == hi for lo, hi in im.getextrema()) for im, _ in blind)  # one colour: nothing to see
    assert not any(all(lo == hi for lo, hi in im.getextrema()) for im, _ in real)
    assert [im.size for im, _ in real] == [im.size for im, _ in blind]
    assert all(r["blind"] for r in results[True]["rows"]) and not any(r["blind"] for r in results[False]["rows"])
    assert set(results[True]["metrics"]) == set(results[False]["metrics"]) == {"overall", "adversarial", "popular",
                                                                               "random"}


def test_scores_show_pope_beside_its_blind_baseline(capsys, monkeypatch):
    """Catches notebook 03 printing POPE without its blind score or without the sentence that says how to read
    the gap."""
    from helpers.scoring.evaluation import pope_scores, show_scores
    from helpers.views import reporting

    tables = []
    monkeypatch.setattr(reporting, "show_table", lambda rows, columns=None: tables.append((rows, columns)))
    rows = [{"expected": e, "predicted": p} for e, p in [("yes", "yes"), ("no", "no"), ("no", "yes"), ("yes", "yes")]]
    always_yes = [dict(r, predicted="yes") for r in rows]
    show_scores({"pope": {"overall": pope_scores(rows), "random": pope_scores(rows)},
                 "pope_blind": {"overall": pope_scores(always_yes), "random": pope_scores(always_yes)},
                 "pope_heldout_removed": {"evaluated_images": 500, "images": 430, "conversations": 800}})
    out = capsys.readouterr().out
    (rows, columns), = tables
    assert "f1" in columns and "f1 blind" in columns
    assert [(r["split"], r["f1"], r["f1 blind"]) for r in rows] == [("overall", "0.800", "0.667"),
                                                                    ("random", "0.800", "0.667")]
    assert "says yes to everything" in out and "gap to the blind score is what it reads from the image" in out
    assert "500 evaluated images were kept out" in out
