"""Full profile: fetch the real data sets once, to local disk, in the formats the readers expect.

* COCO 2017 captions: rows of ``profile.coco_dataset`` (file name, image URL, captions) -> ``images/`` +
  ``annotations/captions_<split>2017.json``; images are downloaded once here, never inside a training step.
* LLaVA-Instruct-150K: ``llava_instruct_150k.json`` from the Hub; its images are COCO train2017 files, so
  records whose image was not fetched are skipped (and counted) by the reader.

This module needs the network and is not exercised offline; the readers it feeds are (tests/test_data.py).
"""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path


def _fetch(url: str, target: Path, tries: int = 3) -> bool:
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                target.write_bytes(r.read())
            return True
        except OSError:
            time.sleep(2 ** attempt)
    return False


def coco_caption_files(profile, paths, split: str):
    root = paths.root / "data" / "coco"
    annotation_file = root / "annotations" / f"captions_{split}2017.json"
    image_dir = root / f"{split}2017"
    if annotation_file.exists():
        return annotation_file, image_dir
    from datasets import load_dataset
    from tqdm.auto import tqdm

    hub_split = "train" if split == "train" else "validation"
    limit = profile.n_train_samples if split == "train" else profile.n_eval_samples
    rows = load_dataset(profile.coco_dataset, split=hub_split, streaming=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for row in tqdm(rows, total=limit, desc=f"COCO {split} images"):
        if len(images) >= limit:
            break
        name = Path(row["file_name"]).name
        target = image_dir / name
        if not target.exists() and not _fetch(row["coco_url"], target):
            continue
        image_id = int(row.get("image_id") or row.get("id") or len(images) + 1)
        images.append({"id": image_id, "file_name": name})
        for caption in row["captions"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations}))
    return annotation_file, image_dir


def llava_instruct_files(profile, paths, split: str):
    """LLaVA-Instruct-150K JSON; the last 1% of records is the held-out split."""
    from huggingface_hub import hf_hub_download

    root = paths.root / "data" / "llava"
    out = root / f"llava_instruct_{split}.json"
    _, image_dir = coco_caption_files(profile, paths, "train")
    if not out.exists():
        source = hf_hub_download(profile.llava_instruct_repo, profile.llava_instruct_file, repo_type="dataset")
        data = json.loads(Path(source).read_text())
        have = {p.name for p in image_dir.iterdir()}
        data = [r for r in data if Path(r.get("image", "")).name in have]
        cut = int(len(data) * 0.99)
        root.mkdir(parents=True, exist_ok=True)
        (root / "llava_instruct_train.json").write_text(json.dumps(data[:cut]))
        (root / "llava_instruct_val.json").write_text(json.dumps(data[cut:]))
    return out, image_dir
