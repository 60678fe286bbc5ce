"""The synthetic world is deterministic, consistent with its scenes, and read by the real-format loaders."""
import dataclasses
import json
import random

import pytest

from helpers.data.multimodal_data import ConversationDataset, read_coco_captions, read_llava_instruct
from helpers.data.world import CELLS, ONE_KIND_TYPES, Scene, ask, build_world, caption, conversation, sample_scene


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
    assert seen == set(ONE_KIND_TYPES) | {"follow-up"}  # the default vocabulary (share 0): one kind per scene


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
    from helpers.data.encoding import encode_conversation

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
    from helpers.data.tokenizer import train_bpe_tokenizer

    paths = Paths(profile, tmp_path)
    tok = stages.ensure_tokenizer(profile, paths)
    calls = []
    monkeypatch.setattr(stages, "run_notebook", lambda name, **kw: calls.append(name))
    paths.base_lm.mkdir(parents=True)
    (paths.base_lm / "config.json").write_text("{}")
    tok.save_pretrained(paths.base_lm)
    stages.ensure_base_lm(profile, paths)
    assert calls == []  # same tokenizer: the saved LM is used
    train_bpe_tokenizer(["a b c d e f g"] * 50, vocab_size=300, out_dir=paths.base_lm)
    stages.ensure_base_lm(profile, paths)
    assert calls == ["01_pretrain_phi"]  # its vocabulary no longer matches: notebook 01 runs again


# ----------------------------------------------------------------------------------------- world seeds
def _vocabulary_words(world_seed):
    from helpers.data.world import vocabulary

    v = vocabulary(world_seed)
    return set(v.colour_names), set(v.shapes), dict(v.templates)


def test_world_zero_is_the_default_vocabulary():
    from helpers.data.world import COLOURS, SHAPES, TEMPLATES, vocabulary

    v = vocabulary(0)
    assert v.colour_names == tuple(COLOURS) and v.shapes == SHAPES
    assert dict(v.templates) == {slot: variants[0] for slot, variants in TEMPLATES.items()}


def test_other_worlds_differ_in_objects_and_wording():
    colours0, shapes0, templates0 = _vocabulary_words(0)
    for world_seed in (1, 2, 3):
        colours, shapes, templates = _vocabulary_words(world_seed)
        assert len(colours) == len(colours0) and len(shapes) == len(shapes0)
        assert colours != colours0 and shapes != shapes0
        assert templates != templates0
    assert _vocabulary_words(1) != _vocabulary_words(2)


def test_a_world_seed_is_deterministic_and_changes_the_files(tmp_path, profile):
    spec1 = dataclasses.replace(profile.world, world_seed=1)
    a = build_world(tmp_path / "a", spec1, progress=False)
    b = build_world(tmp_path / "b", spec1, progress=False)
    assert a.corpus.read_text() == b.corpus.read_text()
    assert a.instruct("val").read_text() == b.instruct("val").read_text()
    other = build_world(tmp_path / "c", dataclasses.replace(profile.world, world_seed=2), progress=False)
    assert other.corpus.read_text() != a.corpus.read_text()
    colours, shapes, _ = _vocabulary_words(1)
    text = a.corpus.read_text()
    assert all(c in text for c in colours) and all(s in text for s in shapes)
    unused = (set(_vocabulary_words(0)[0]) | set(_vocabulary_words(0)[1])) - colours - shapes
    assert not any(f" {w} " in text or f" {w}." in text for w in unused)


def test_answers_agree_with_the_scene_in_every_world():
    from helpers.data.world import NUMBER_WORDS, plural, vocabulary

    for world_seed in (0, 1, 2, 5):
        vocab = vocabulary(world_seed)
        rng = random.Random(world_seed)
        for _ in range(300):
            scene = sample_scene(rng, vocab)
            n, c, s = len(scene.things), scene.colour, scene.shape
            assert c in vocab.colour_names and s in vocab.shapes
            for turn in conversation(scene, rng, 3, vocab=vocab):
                q, a, t = turn["question"], turn["answer"], turn["type"]
                if t in ("colour",):
                    assert a == c
                elif t == "shape":
                    assert a == s
                elif t == "position":
                    assert a in CELLS and (n == 1 and a == scene.things[0].cell or
                                           n == 3 and a not in {x.cell for x in scene.things})
                elif t == "count":
                    asked = [x for x in vocab.shapes if plural(x) in q.split(" ")]
                    assert a == (NUMBER_WORDS[n] if not asked or asked == [s] else "zero")
                elif t == "yes/no":
                    words = q.rstrip("?").split()
                    assert (a == "yes") == (c in words or plural(s) in words)
            text = caption(scene, vocab)
            assert NUMBER_WORDS[n] in text.split() and c in text and text.count("the ") == n


@pytest.mark.parametrize("world_seed", [0, 1])
def test_heldout_scenes_come_from_their_own_stream(tmp_path, profile, world_seed):
    spec = dataclasses.replace(profile.world, world_seed=world_seed)
    files = build_world(tmp_path / "w", spec, progress=False)
    train = json.loads(files.instruct("train").read_text())
    val = json.loads(files.instruct("val").read_text())
    assert {r["image"] for r in train}.isdisjoint({r["image"] for r in val})
    train_images = {p.read_bytes() for p in files.images("train").iterdir()}
    assert not any(p.read_bytes() in train_images for p in files.images("val").iterdir())
