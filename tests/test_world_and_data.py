"""The synthetic world is deterministic, consistent with its scenes, and read by the real-format loaders."""
import json
import random

import pytest

from helpers.multimodal_data import ConversationDataset, read_coco_captions, read_llava_instruct
from helpers.world import CELLS, QUESTION_TYPES, Scene, ask, build_world, caption, conversation, sample_scene


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
    words = ["zero", "one", "two", "three"]
    seen = set()
    for _ in range(400):
        scene = sample_scene(rng)
        n, c, s = len(scene.things), scene.colour, scene.shape
        for turn in conversation(scene, rng, 3):
            q, a, t = turn["question"], turn["answer"], turn["type"]
            seen.add(t)
            if q == "How many objects are there?":
                assert a == words[n]
            elif q.startswith("How many ") and q != "And how many are there?":
                assert a == (words[n] if q[len("How many "):].startswith(s) else "zero")
            elif t == "colour" or q.startswith("And what colour"):
                assert a == c
            elif t == "shape":
                assert a == s
            elif q.startswith("Where is"):
                assert n == 1 and a == scene.things[0].cell
            elif q == "Which cell is empty?":
                assert n == 3 and a not in {x.cell for x in scene.things}
            elif t == "yes/no":
                asked = q.rstrip("?").split()[-1]
                if q.startswith("Is the colour"):
                    assert (a == "yes") == (asked == c)
                else:  # "Are there circles?"
                    assert q.startswith("Are there ") and (a == "yes") == (asked == s + "s")
        assert caption(scene).startswith(["one", "two", "three"][n - 1] + " " + c + " " + s)
        assert caption(scene).count("the ") == n
    assert seen == set(QUESTION_TYPES)


def test_position_is_asked_only_when_it_has_one_answer():
    two = Scene.from_dict({"things": [{"colour": "red", "shape": "circle", "cell": CELLS[0]},
                                      {"colour": "red", "shape": "circle", "cell": CELLS[1]}]})
    assert ask(two, "position", random.Random(0)) is None
    assert ask(two, "follow-up", random.Random(0), previous=None) is None


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


def test_a_world_of_other_settings_is_replaced_and_the_tokenizer_follows(tmp_path, profile):
    import dataclasses

    from helpers import stages
    from helpers.config import Paths

    paths = Paths(profile, tmp_path)
    first = stages.ensure_world(profile, paths)
    corpus = first.corpus.read_text()
    tok_file = paths.tokenizer / "tokenizer.json"
    stages.ensure_tokenizer(profile, paths)
    trained_at = tok_file.stat().st_mtime_ns
    stages.ensure_tokenizer(profile, paths)
    assert tok_file.stat().st_mtime_ns == trained_at  # same world: reused, not retrained

    other = dataclasses.replace(profile, world=dataclasses.replace(profile.world, corpus_questions=2))
    second = stages.ensure_world(other, paths)
    assert second.complete(other.world) and not second.complete(profile.world)
    assert second.corpus.read_text() != corpus  # regenerated, not reused
    stages.ensure_tokenizer(other, paths)
    assert tok_file.stat().st_mtime_ns != trained_at  # trained on the new world's text


def test_a_base_lm_trained_with_another_tokenizer_is_retrained(tmp_path, profile, monkeypatch):
    from helpers import stages
    from helpers.config import Paths
    from helpers.tokenizer import train_bpe_tokenizer

    paths = Paths(profile, tmp_path)
    tok = stages.ensure_tokenizer(profile, paths)
    calls = []
    monkeypatch.setattr(stages, "pretrain_stage", lambda profile, paths: calls.append("01"))
    paths.base_lm.mkdir(parents=True)
    (paths.base_lm / "config.json").write_text("{}")
    tok.save_pretrained(paths.base_lm)
    stages.ensure_base_lm(profile, paths)
    assert calls == []  # same tokenizer: the saved LM is used
    train_bpe_tokenizer(["a b c d e f g"] * 50, vocab_size=300, out_dir=paths.base_lm)
    stages.ensure_base_lm(profile, paths)
    assert calls == ["01"]  # its vocabulary no longer matches: stage 01 runs again
