"""The synthetic world is deterministic, consistent with its scenes, and read by the real-format loaders."""
import json
import random

import pytest

from helpers.multimodal_data import ConversationDataset, read_coco_captions, read_llava_instruct
from helpers.world import CELLS, COLOURS, Scene, ask, build_world, caption, conversation, sample_scene


def test_world_is_deterministic(tmp_path, profile):
    a = build_world(tmp_path / "a", profile.world, progress=False)
    b = build_world(tmp_path / "b", profile.world, progress=False)
    assert a.instruct("train").read_text() == b.instruct("train").read_text()
    assert a.corpus.read_text() == b.corpus.read_text()
    name = sorted(p.name for p in a.images("train").iterdir())[0]
    assert (a.images("train") / name).read_bytes() == (b.images("train") / name).read_bytes()


def test_heldout_split_is_disjoint(world):
    train = {r["image"] for r in json.loads(world.instruct("train").read_text())}
    val = {r["image"] for r in json.loads(world.instruct("val").read_text())}
    assert train and val and not train & val


def test_answers_agree_with_the_scene():
    rng = random.Random(0)
    for _ in range(300):
        scene = sample_scene(rng)
        for turn in conversation(scene, rng, 3):
            q, a, t = turn["question"], turn["answer"], turn["type"]
            if t == "count" and q == "How many objects are there?":
                assert a == ["zero", "one", "two", "three"][len(scene.things)]
            if t == "position" and "Where is the" in q:
                thing = next(x for x in scene.things if x.name in q)
                assert a == thing.cell
            if t == "yes/no":
                name = q[len("Is there a "):-1]
                assert (a == "yes") == any(x.name == name for x in scene.things)
        assert caption(scene).count(" at the ") == len(scene.things)


def test_colour_question_needs_a_unique_shape():
    scene = Scene.from_dict({"things": [{"colour": "red", "shape": "circle", "cell": CELLS[0]},
                                        {"colour": "blue", "shape": "circle", "cell": CELLS[1]}]})
    assert ask(scene, "colour", random.Random(0)) is None


def test_coco_and_llava_files_load(world, tok, profile):
    captions, report = read_coco_captions(world.captions("train"), world.images("train"))
    assert report.kept == profile.world.n_train_images and not report.skipped
    records, report = read_llava_instruct(world.instruct("val"), world.images("val"))
    assert len(records) == profile.world.n_heldout_images
    assert records[0].messages[0]["content"].startswith("<image>\n")
    assert len(records[0].meta["types"]) == profile.world.turns_per_conversation


def test_malformed_llava_records_are_skipped_and_counted(world, tmp_path):
    good = json.loads(world.instruct("val").read_text())
    bad = [
        {"id": "x1", "image": "missing.jpg", "conversations": good[0]["conversations"]},
        {"id": "x2", "image": good[0]["image"], "conversations": [{"from": "human", "value": "<image>\nHi"}]},
        {"id": "x3", "conversations": good[0]["conversations"]},
    ]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(good + bad))
    records, report = read_llava_instruct(path, world.images("val"))
    assert report.kept == len(good)
    assert report.skipped == {"with missing image file": 1, "without an answer": 1, "without image": 1}
    assert "skipped 3" in report.summary()


def test_mostly_bad_data_stops_with_a_clear_error(world, tmp_path):
    good = json.loads(world.instruct("val").read_text())[:1]
    bad = [{"id": str(i), "image": "nope.jpg", "conversations": good[0]["conversations"]} for i in range(5)]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(good + bad))
    with pytest.raises(ValueError, match="too many malformed records"):
        read_llava_instruct(path, world.images("val"))


def test_coco_records_with_missing_images_are_counted(world, tmp_path):
    coco = json.loads(world.captions("val").read_text())
    coco["annotations"].append({"id": 999, "image_id": 123456789, "caption": "x"})
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    _, report = read_coco_captions(path, world.images("val"))
    assert report.skipped == {"without image entry": 1}


def test_conversations_over_the_context_are_skipped(world, tok):
    from helpers.encoding import encode_conversation

    records, _ = read_llava_instruct(world.instruct("val"), world.images("val"))
    lengths = [len(encode_conversation(tok, r.messages, 16)["input_ids"]) for r in records]
    cut = sorted(lengths)[len(lengths) * 3 // 4]  # at least three quarters fit
    ds = ConversationDataset(records, tok, image_seq_length=16, max_length=cut)
    assert ds.report.skipped["over the context length"] == sum(n > cut for n in lengths)
    assert len(ds) == sum(n <= cut for n in lengths)
