"""Sources and settings of the full profile: a Hub id or a local path per source, clear errors, trustworthy
downloads, data prepared in the real formats (COCO parquet -> captions JSON, LLaVA-Instruct split by image)."""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from helpers.config import FULL, PINNED_REVISIONS, get_profile, parse_settings
from helpers.data import sources
from helpers.data.downloads import fetch, fetch_all
from helpers.data.sources import SourceError


# ------------------------------------------------------------------------------------------------ settings
def test_each_source_has_its_own_environment_variable_and_settings_override(monkeypatch):
    monkeypatch.setenv("MMPHI_PHI2", "/data/phi-2")
    monkeypatch.setenv("MMPHI_POPE", "me/pope@v1")
    monkeypatch.setenv("MMPHI_SETTINGS", "instruct.max_steps=3, n_train_samples=64, train_missing_stages=true")
    profile = get_profile("full", {"instruct.batch_size": 2, "coco": "./coco"})
    assert profile.llm_checkpoint == profile.tokenizer_checkpoint == "/data/phi-2"
    assert profile.pope_dataset == "me/pope@v1" and profile.coco_dataset == "./coco"
    assert (profile.instruct.max_steps, profile.instruct.batch_size, profile.n_train_samples) == (3, 2, 64)
    assert profile.train_missing_stages is True
    assert profile.instruct.learning_rate == FULL.instruct.learning_rate  # the rest unchanged


def test_unknown_or_malformed_settings_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="unknown setting 'instruct_max_steps'"):
        get_profile("full", {"instruct_max_steps": 3})
    with pytest.raises(ValueError, match="has no setting 'maxsteps'"):
        get_profile("full", {"instruct.maxsteps": 3})
    with pytest.raises(ValueError, match="not a int"):
        get_profile("full", {"instruct.max_steps": "three"})
    with pytest.raises(ValueError, match="key=value"):
        parse_settings("instruct.max_steps")


def test_hub_ids_use_the_pinned_revision_unless_they_name_one():
    assert sources.parse_hub_id("microsoft/phi-2") == ("microsoft/phi-2", PINNED_REVISIONS["microsoft/phi-2"])
    assert sources.parse_hub_id("microsoft/phi-2@main") == ("microsoft/phi-2", "main")
    assert sources.parse_hub_id("lmms-lab/POPE") == ("lmms-lab/POPE", "main")
    assert len(PINNED_REVISIONS["microsoft/phi-2"]) == 40


# ------------------------------------------------------------------------------------------------ errors
def test_a_missing_local_source_names_the_setting_and_where_it_looked(tmp_path):
    profile = FULL.replace(llm_checkpoint=str(tmp_path / "nowhere"))
    with pytest.raises(SourceError, match=r"MMPHI_PHI2 = .*nowhere.*does not exist"):
        sources.source_folder(profile, "phi2")


def test_a_malformed_local_source_says_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    profile = FULL.replace(clip_checkpoint=str(tmp_path))
    with pytest.raises(SourceError, match=r"MMPHI_CLIP.*lacks preprocessor_config.json, \*.safetensors"):
        sources.source_folder(profile, "clip")


def test_a_hub_id_offline_without_a_copy_fails_clearly(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    profile = FULL.replace(pope_dataset="nobody/nothing")
    with pytest.raises(SourceError) as err:
        sources.source_folder(profile, "pope")
    message = str(err.value)
    assert "MMPHI_POPE = 'nobody/nothing'" in message and "revision main" in message
    assert str(tmp_path) in message and "offline" in message


def test_neither_a_path_nor_a_hub_id_is_refused():
    profile = FULL.replace(coco_dataset="not a source")
    with pytest.raises(SourceError, match="neither an existing local path nor a Hub id"):
        sources.source_folder(profile, "coco")


# ------------------------------------------------------------------------------------------------ downloads
def _jpeg(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)
    return path


def test_downloads_are_parallel_resumable_and_leave_no_half_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    good = [_jpeg(src / f"{i}.jpg") for i in range(5)]
    (src / "bad.jpg").write_bytes(b"not a jpeg at all")
    jobs = [(p.as_uri(), dst / p.name) for p in good] + [((src / "bad.jpg").as_uri(), dst / "bad.jpg"),
                                                       ((src / "gone.jpg").as_uri(), dst / "gone.jpg")]
    (dst).mkdir()
    (dst / "0.jpg.part").write_bytes(b"half a file from a killed run")
    report = fetch_all(jobs, workers=4, progress=False, backoff=0)
    assert report.fetched == 5
    assert report.failed == {"unreadable image": 1, "missing at the source": 1}
    assert sorted(p.name for p in dst.glob("*.jpg")) == sorted(p.name for p in good)  # only decodable images
    assert not list(dst.glob("*.part"))
    (dst / "3.jpg").unlink()  # a rerun fetches only what is missing
    again = fetch_all(jobs, workers=4, progress=False, backoff=0)
    assert (again.fetched, again.already_there) == (1, 4)
    assert again.failed["unreadable image"] == 1


def test_a_flaky_download_is_retried(tmp_path, monkeypatch):
    target, calls = tmp_path / "x.bin", []
    real = urllib.request.urlopen

    def flaky(request, timeout=None):
        calls.append(1)
        if len(calls) < 3:
            raise urllib.error.URLError("connection reset")
        return real(request, timeout=timeout)

    source = tmp_path / "source.bin"
    source.write_bytes(b"payload")
    monkeypatch.setattr(urllib.request, "urlopen", flaky)
    assert fetch(source.as_uri(), target, tries=4, backoff=0) is None
    assert target.read_bytes() == b"payload" and len(calls) == 3
    calls.clear()
    assert fetch(source.as_uri(), tmp_path / "y.bin", tries=2, backoff=0) == "URLError"
    assert not (tmp_path / "y.bin").exists() and not (tmp_path / "y.bin.part").exists()


# ------------------------------------------------------------------------------------------------ data sets
def _coco_parquet(folder: Path, images: Path, n: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i in range(n):
        name = f"{i + 1:012d}.jpg"
        if i != 1:  # image 2 is missing at the source
            _jpeg(images / "train2017" / name, (20 * i, 80, 160))
        rows.append({"license": 1, "file_name": name, "coco_url": f"http://images.cocodataset.org/train2017/{name}",
                     "height": 30, "width": 40, "date_captured": "2013-11-14 17:02:52", "flickr_url": "",
                     "image_id": i + 1, "ids": [10 * i + k for k in range(5)],
                     "captions": [f"caption {k} of image {i + 1}" for k in range(5)]})
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "data" / "train-00000-of-00001-x.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), folder / "data" / "validation-00000-of-00001-y.parquet")


def test_coco_counts_images_and_keeps_every_caption(tmp_path):
    from helpers.config import Paths
    from helpers.data.hub_data import coco_caption_files
    from helpers.data.multimodal_data import read_coco_captions

    _coco_parquet(tmp_path / "coco", tmp_path / "images", n=6)
    profile = FULL.replace(coco_dataset=str(tmp_path / "coco"), coco_images=str(tmp_path / "images"),
                           n_train_samples=4)
    paths = Paths(profile, tmp_path / "out")
    annotation_file, image_dir = coco_caption_files(profile, paths, "train")
    coco = json.loads(annotation_file.read_text())
    assert [img["id"] for img in coco["images"]] == [1, 3, 4]  # 4 images asked for, the missing one skipped
    assert len(coco["annotations"]) == 15  # every caption of each image
    records, _ = read_coco_captions(annotation_file, image_dir)
    assert len(records) == 15
    stamp_time = annotation_file.stat().st_mtime_ns
    coco_caption_files(profile, paths, "train")
    assert annotation_file.stat().st_mtime_ns == stamp_time  # same settings: reused
    coco_caption_files(profile.replace(n_train_samples=6), paths, "train")
    assert len(json.loads(annotation_file.read_text())["images"]) == 5  # other settings: prepared again


def test_llava_instruct_is_split_by_image(tmp_path):
    from helpers.data.hub_data import split_by_image

    records = [{"id": str(i), "image": f"{i % 400:012d}.jpg", "conversations": []} for i in range(2000)]
    train, held = split_by_image(records, n_held_out=3)
    assert len(train) + len(held) == 2000 and len(held) >= 3
    assert not {r["image"] for r in train} & {r["image"] for r in held}
    assert len({r["image"] for r in held}) == 4  # 1 % of the 400 images
    train2, held2 = split_by_image(list(reversed(records)), n_held_out=3)
    assert {r["image"] for r in held2} == {r["image"] for r in held}  # by image name, not by file order
    _, many = split_by_image(records, n_held_out=100)
    assert len(many) >= 100 and {r["image"] for r in held} <= {r["image"] for r in many}
