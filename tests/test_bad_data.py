"""Bad data is reported, skipped and counted, never a crash deep in a long run: missing, empty, non-image and
truncated image files, conversations without an answer, text over the context; a mostly-bad set stops clearly."""
from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from helpers.data.multimodal_data import ConversationDataset, read_coco_captions, read_llava_instruct


@pytest.fixture()
def damaged_val(world, tmp_path):
    """A copy of the held-out images with one empty file, one non-image and one truncated JPEG (whose header still
    passes PIL's verify: only decoding it fails)."""
    images = tmp_path / "images"
    shutil.copytree(world.images("val"), images)
    names = sorted(p.name for p in images.iterdir())
    (images / names[0]).write_bytes(b"")
    (images / names[1]).write_text("not an image at all")
    data = (images / names[2]).read_bytes()
    (images / names[2]).write_bytes(data[: int(len(data) * 0.8)])
    with Image.open(images / names[2]) as im:
        im.verify()  # the truncation is only found by a full decode
    return images, names[:3]


def test_llava_loader_counts_unreadable_missing_and_answerless_records(world, damaged_val, tmp_path, capsys):
    images, (empty, garbage, truncated) = damaged_val
    good = json.loads(world.instruct("val").read_text())
    fine = next(r for r in good if r["image"] not in (empty, garbage, truncated))
    bad = [{"id": "m", "image": "missing.jpg", "conversations": fine["conversations"]},
           {"id": "n", "image": fine["image"], "conversations": [{"from": "human", "value": "<image>\nHi"}]}]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(good + bad))
    records, report = read_llava_instruct(path, images)
    n_bad_image = sum(r["image"] in (empty, garbage) for r in good)
    assert n_bad_image >= 2
    assert report.skipped == {"with unreadable image file": n_bad_image, "with missing image file": 1,
                              "without an answer": 1}
    assert report.kept == len(good) - n_bad_image
    printed = capsys.readouterr().out
    assert f"LLaVA instruct mixed.json: kept {report.kept} records, skipped {n_bad_image + 2}" in printed
    assert f"{n_bad_image} with unreadable image file" in printed


def test_coco_loader_counts_unreadable_images_and_empty_captions(world, damaged_val, tmp_path, capsys):
    images, (empty, garbage, _) = damaged_val
    coco = json.loads(world.captions("val").read_text())
    coco["annotations"].append({"id": 10**6, "image_id": coco["images"][0]["id"], "caption": "  "})
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    records, report = read_coco_captions(path, images)
    ids = {img["id"] for img in coco["images"] if img["file_name"] in (empty, garbage)}
    n_bad = sum(a["image_id"] in ids for a in coco["annotations"][:-1])
    assert report.skipped == {"with unreadable image file": n_bad, "with empty caption": 1}
    assert "COCO captions captions.json: kept" in capsys.readouterr().out


def test_truncated_image_found_when_features_are_cached_and_skipped(world, damaged_val, llava, tok, profile,
                                                                   tmp_path, capsys):
    from helpers.models.modeling import image_processor
    from helpers.train.projection import feature_table, make_dataset

    images, (_, _, truncated) = damaged_val
    records, report = read_llava_instruct(world.instruct("val"), images)
    n_truncated = sum(r.image.name == truncated for r in records)
    assert n_truncated >= 1  # PIL's verify lets the truncated JPEG through (the empty and non-image files not)...
    tower, proc = llava.model.vision_tower, image_processor(profile.vision)
    feats, index = feature_table(tower, proc, records, -2, tmp_path / "features")
    assert str(images / truncated) not in index  # ... the full decode does not
    assert "1 of" in capsys.readouterr().out
    ds = make_dataset(records, tok, profile, feats, index, profile.instruct)
    assert ds.report.skipped == {"with unreadable image file": n_truncated}
    assert len(ds) == len(records) - n_truncated
    assert "conversation encoding: kept" in capsys.readouterr().out
    # the cached features remember which images were unreadable
    feats2, index2 = feature_table(tower, proc, records, -2, tmp_path / "features")
    assert index2 == index and feats2.shape == feats.shape


def test_mostly_unreadable_images_stop_with_a_clear_error(world, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(world.images("val"), images)
    for p in sorted(images.iterdir())[1:]:
        p.write_bytes(b"\xff\xd8 broken")
    with pytest.raises(ValueError, match=r"too many malformed records.*unreadable image file"):
        read_llava_instruct(world.instruct("val"), images)


def test_conversations_over_the_context_are_counted_in_the_summary(world, tok, capsys):
    records, _ = read_llava_instruct(world.instruct("val"), world.images("val"))
    ds = ConversationDataset(records, tok, image_seq_length=16, max_length=10**6)
    assert not ds.report.skipped
    with pytest.raises(ValueError, match="too many malformed records.*over the context length"):
        ConversationDataset(records, tok, image_seq_length=16, max_length=8)
    assert "conversation encoding: kept 0 records" in capsys.readouterr().out
