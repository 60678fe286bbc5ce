"""Read image-text data in the real formats and turn it into training examples.

* COCO 2017 captions JSON (``images`` + ``annotations``) -> one caption conversation per annotation;
* LLaVA-Instruct JSON (``image`` + ``conversations`` with ``<image>``) -> one multi-turn conversation per record.

Malformed records (missing or unreadable image file, conversation without an answer, too long for the context)
are skipped and counted instead of crashing a long run, and each loader prints a one-line summary of what it kept
and skipped; if most records are bad the loader stops with a clear error. Images are checked when read (PIL's
``verify``: empty, truncated or non-image files) and again when their vision features are computed (a full decode,
``helpers.models.vision.cache_features``); records whose image fails either are skipped.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from helpers.data.chat_template import IMAGE_TOKEN, from_llava, user_message
from helpers.data.encoding import encode_conversation
from helpers.data.world import CAPTION_REQUEST as CAPTION_INSTRUCTION  # the same words as in the pretraining corpus


@dataclass
class Record:
    image: Path
    messages: list[dict]
    meta: dict = field(default_factory=dict)


@dataclass
class LoadReport:
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    pope_heldout: dict = field(default_factory=dict)  # evaluated POPE images removed on purpose (helpers.stages)

    def skip(self, reason: str):
        self.skipped[reason] += 1

    def summary(self) -> str:
        bad = sum(self.skipped.values())
        reasons = ", ".join(f"{n} {r}" for r, n in self.skipped.most_common()) or "none"
        return f"kept {self.kept} records, skipped {bad} ({reasons})"

    def print_summary(self, what: str):
        print(f"{what}: {self.summary()}", flush=True)

    def check(self, what: str, max_bad_fraction: float = 0.5):
        total = self.kept + sum(self.skipped.values())
        if total == 0 or self.kept == 0 or sum(self.skipped.values()) / total > max_bad_fraction:
            raise ValueError(f"{what}: too many malformed records – {self.summary()}. Check the data paths.")


def image_problem(path: Path, cache: dict | None = None) -> str | None:
    """'with missing image file' / 'with unreadable image file' or None; cached per path (many records, one image)."""
    key = str(path)
    if cache is not None and key in cache:
        return cache[key]
    problem = None
    if not path.exists():
        problem = "with missing image file"
    else:
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception:  # PIL raises many kinds (UnidentifiedImageError, SyntaxError, OSError, ...)
            problem = "with unreadable image file"
    if cache is not None:
        cache[key] = problem
    return problem


def caption_messages(caption: str) -> list[dict]:
    return [user_message(CAPTION_INSTRUCTION, with_image=True), {"role": "assistant", "content": caption.strip()}]


def read_coco_captions(annotation_file: str | Path, image_dir: str | Path,
                       limit: int | None = None) -> tuple[list[Record], LoadReport]:
    data = json.loads(Path(annotation_file).read_text())
    files = {img["id"]: img["file_name"] for img in data.get("images", [])}
    records, report, checked = [], LoadReport(), {}
    for ann in data.get("annotations", []):
        if limit is not None and report.kept >= limit:
            break
        name = files.get(ann.get("image_id"))
        text = (ann.get("caption") or "").strip()
        if name is None:
            report.skip("without image entry")
            continue
        if not text:
            report.skip("with empty caption")
            continue
        path = Path(image_dir) / name
        problem = image_problem(path, checked)
        if problem:
            report.skip(problem)
            continue
        records.append(Record(path, caption_messages(text), {"image_id": ann["image_id"]}))
        report.kept += 1
    report.print_summary(f"COCO captions {Path(annotation_file).name}")
    report.check(f"COCO captions {annotation_file}")
    return records, report


def read_llava_instruct(json_file: str | Path, image_dir: str | Path,
                        limit: int | None = None) -> tuple[list[Record], LoadReport]:
    data = json.loads(Path(json_file).read_text())
    records, report, checked = [], LoadReport(), {}
    for row in data:
        if limit is not None and report.kept >= limit:
            break
        if "image" not in row:
            report.skip("without image")
            continue
        path = Path(image_dir) / row["image"]
        problem = image_problem(path, checked)
        if problem:
            report.skip(problem)
            continue
        try:
            messages = from_llava(row.get("conversations") or [])
        except ValueError:
            report.skip("with unknown speaker")
            continue
        if not any(m["role"] == "assistant" and (m["content"] or "").strip() for m in messages):
            report.skip("without an answer")
            continue
        # LLaVA puts <image> first or last in the first human turn; normalise to the front, once
        first = messages[0]["content"].replace(IMAGE_TOKEN, "").strip()
        messages[0] = user_message(first, with_image=True)
        for m in messages[1:]:
            m["content"] = m["content"].replace(IMAGE_TOKEN, "").strip()
        records.append(Record(path, messages, {"id": row.get("id"), "types": row.get("question_types")}))
        report.kept += 1
    report.print_summary(f"LLaVA instruct {Path(json_file).name}")
    report.check(f"LLaVA instruct {json_file}")
    return records, report


class ConversationDataset(Dataset):
    """Encoded conversations paired with each image's cached vision features (row `feature_index[path]`; a record
    whose image is not in the index – it could not be decoded when the features were computed – is skipped)."""

    def __init__(self, records: list[Record], tok, image_seq_length: int, max_length: int, features=None,
                 feature_index: dict | None = None):
        self.examples, self.report = [], LoadReport()
        for r in records:
            if features is not None and str(r.image) not in feature_index:
                self.report.skip("with unreadable image file")
                continue
            enc = encode_conversation(tok, r.messages, image_seq_length, max_length)
            if enc is None:
                self.report.skip("over the context length")
                continue
            if features is not None:
                enc["vision_features"] = features[feature_index[str(r.image)]]
            self.examples.append(enc)
            self.report.kept += 1
        if sum(self.report.skipped.values()):
            self.report.print_summary("conversation encoding")
        self.report.check("conversation encoding")

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]
