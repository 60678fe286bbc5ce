"""Full profile: the real data sets, prepared once on local disk in the formats the readers expect.

Each source is a Hub id or a local path (:mod:`helpers.data.sources`); images are fetched by
:func:`helpers.data.downloads.fetch_all` (parallel, resumable, atomic, retried), never inside a training step.

* **COCO 2017 captions** (``phiyodr/coco2017`` parquet: one row per image with its captions and ``coco_url``) ->
  ``data/coco/annotations/captions_<split>2017.json`` (the official COCO captions layout) + ``data/coco/<split>2017/``.
  ``n_train_samples`` counts *images* for stage 02 (every caption of each image is used); ``n_eval_samples``
  images of the validation split are held out.
* **LLaVA-Instruct-150K** (one JSON list): split into training and held-out conversations **by image** (an image's
  conversations are all on one side), ``n_train_samples`` / ``n_eval_samples`` conversations; their images are
  COCO train2017 files, fetched like the captions' images.
* **TinyStories** (parquet shards): only as many shards as the first ``n`` stories need (a sliced download: the
  first shard holds ~530k stories), read lazily.
* **POPE** (``lmms-lab/POPE`` parquet, images embedded): ``n`` questions spread evenly over its three categories.
  Its images are COCO val2014 images, most of them also in train2017 (hub_formats §12): their ids
  (:func:`pope_image_ids`) are removed from stage 02's captions and stage 03's conversations when those are read for
  training (``helpers.stages``), whatever was prepared or cached before.
* **MMStar** (``Lin-Chen/MMStar``: one ``mmstar.parquet``, images embedded, the options inside the question text):
  ``n`` questions spread evenly over its categories.

Every prepared file carries a stamp of the settings it was made from; other settings (another source, revision or
size) prepare it again instead of reusing a stale copy.
"""
from __future__ import annotations

import hashlib
import json
import re
import urllib.parse
from pathlib import Path

from helpers.data import sources
from helpers.data.downloads import fetch_all
from helpers.data.sources import SourceError

COCO_COLUMNS = ("file_name", "coco_url", "image_id", "captions")
POPE_COLUMNS = ("question", "answer", "category", "image")
POPE_CATEGORIES = ("adversarial", "popular", "random")
MMSTAR_FILE = "mmstar.parquet"
MMSTAR_COLUMNS = ("index", "question", "image", "answer", "category")
HELD_OUT_PERCENT = 1  # LLaVA-Instruct: at least this percentage of the images is held out (see split_by_image)


# ------------------------------------------------------------------------------------------------ helpers
PREPARATION_VERSION = 2  # raised whenever the way data is prepared changes: older copies are prepared again


def _stamp(**settings) -> str:
    return json.dumps({"version": PREPARATION_VERSION, **settings}, sort_keys=True, default=str)


def _fresh(stamp_file: Path, stamp: str, *outputs: Path) -> bool:
    return stamp_file.exists() and stamp_file.read_text() == stamp and all(p.exists() for p in outputs)


def _revision(spec: str) -> str:
    return "" if sources.is_local(spec) or sources.is_url(spec) else sources.parse_hub_id(spec)[1]


def read_parquet_rows(files: list[Path], columns: tuple[str, ...], key: str, spec: str, limit: int | None = None,
                      where=None):
    """Rows (dicts) of parquet `files` in order, lazily, up to `limit` (rows for which `where(row)` is true)."""
    import pyarrow.parquet as pq

    n = 0
    for path in files:
        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:
            raise SourceError(f"{sources.setting_label(key, spec)}: {path} is not a readable parquet file "
                              f"({type(exc).__name__}: {exc}).") from exc
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise SourceError(f"{sources.setting_label(key, spec)}: {path.name} lacks the columns {missing} "
                              f"(it has {parquet.schema_arrow.names}); expected {sources.SOURCES[key].what}.")
        for batch in parquet.iter_batches(batch_size=512, columns=list(columns)):
            for row in batch.to_pylist():
                if where is not None and not where(row):
                    continue
                yield row
                n += 1
                if limit is not None and n >= limit:
                    return


def image_url(base: str, coco_url: str | None, split_dir: str, file_name: str) -> str:
    """The image's URL under the configured base: the path of its ``coco_url`` (``/train2017/x.jpg``) if given."""
    path = urllib.parse.urlparse(coco_url).path if coco_url else f"/{split_dir}/{file_name}"
    return base + path


# ------------------------------------------------------------------------------------------------ COCO
def coco_caption_files(profile, paths, split: str):
    """(captions JSON, image folder) of `split` ("train" or "val"), prepared once."""
    spec = profile.coco_dataset
    root = paths.root / "data" / "coco"
    annotation_file = root / "annotations" / f"captions_{split}2017.json"
    image_dir = root / f"{split}2017"
    limit = profile.n_train_samples if split == "train" else profile.n_eval_samples
    stamp = _stamp(source=spec, revision=_revision(spec), images=profile.coco_images, split=split, limit=limit)
    stamp_file = annotation_file.with_suffix(".settings.json")
    if _fresh(stamp_file, stamp, annotation_file):
        return annotation_file, image_dir
    folder = sources.source_folder(profile, "coco")
    pattern = "data/train-*.parquet" if split == "train" else "data/validation-*.parquet"
    rows = list(read_parquet_rows(sources.parquet_files(folder, pattern, "coco", spec), COCO_COLUMNS, "coco", spec,
                                  limit))
    base = sources.image_base(profile)
    jobs = [(image_url(base, r["coco_url"], f"{split}2017", Path(r["file_name"]).name),
             image_dir / Path(r["file_name"]).name) for r in rows]
    report = fetch_all(jobs, desc=f"COCO {split}2017 images")
    images, annotations = [], []
    for row in rows:
        name = Path(row["file_name"]).name
        if not (image_dir / name).exists():
            continue  # failed or unreadable: counted in the download report
        images.append({"id": int(row["image_id"]), "file_name": name, "coco_url": row["coco_url"]})
        for caption in row["captions"] or []:
            annotations.append({"id": len(annotations) + 1, "image_id": int(row["image_id"]), "caption": caption})
    if not images:
        raise SourceError(f"{sources.setting_label('coco_images', profile.coco_images)}: none of the {len(rows)} "
                          f"COCO {split} images could be fetched ({report.summary()}).")
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    annotation_file.write_text(json.dumps({
        "info": {"description": f"COCO 2017 {split} captions via {spec}", "version": "1.0"},
        "licenses": [], "images": images, "annotations": annotations}))
    stamp_file.write_text(stamp)
    return annotation_file, image_dir


# -------------------------------------------------------------------------------------------- LLaVA-Instruct
def _image_key(image_name: str) -> bytes:
    return hashlib.sha1(Path(image_name).name.encode()).digest()


def split_by_image(records: list[dict], n_held_out: int) -> tuple[list[dict], list[dict]]:
    """(training, held-out) records; every conversation about one image is on the same side.

    Images are ordered by a hash of their name (stable, unrelated to the file's order) and held out from the top of
    that order until they hold at least `n_held_out` conversations and at least HELD_OUT_PERCENT % of the images."""
    by_image: dict[str, list[dict]] = {}
    for record in records:
        by_image.setdefault(Path(record.get("image") or "").name, []).append(record)
    held_images, n_held = set(), 0
    min_images = -(-len(by_image) * HELD_OUT_PERCENT // 100)
    for name in sorted(by_image, key=_image_key):
        if n_held >= n_held_out and len(held_images) >= min_images:
            break
        held_images.add(name)
        n_held += len(by_image[name])
    train = [r for r in records if Path(r.get("image") or "").name not in held_images]
    held = [r for r in records if Path(r.get("image") or "").name in held_images]
    return train, held


def llava_instruct_files(profile, paths, split: str):
    """(LLaVA-Instruct JSON of `split`, image folder), prepared once for both splits."""
    spec = profile.llava_instruct_repo
    root = paths.root / "data" / "llava"
    out = {s: root / f"llava_instruct_{s}.json" for s in ("train", "val")}
    image_dir = paths.root / "data" / "coco" / "train2017"
    stamp = _stamp(source=spec, file=profile.llava_instruct_file, revision=_revision(spec),
                   images=profile.coco_images, train=profile.n_train_samples, val=profile.n_eval_samples,
                   held_out_percent=HELD_OUT_PERCENT)
    stamp_file = root / "settings.json"
    if _fresh(stamp_file, stamp, *out.values()):
        return out[split], image_dir
    path = sources.source_file(profile, "llava_instruct", profile.llava_instruct_file)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"{sources.setting_label('llava_instruct', spec)}: {path} is not readable JSON "
                          f"({type(exc).__name__}).") from exc
    if not isinstance(data, list) or not all(isinstance(r, dict) and "conversations" in r for r in data[:100]):
        raise SourceError(f"{sources.setting_label('llava_instruct', spec)}: {path} is not a JSON list of "
                          "{id, image, conversations} records.")
    train, held = split_by_image([r for r in data if r.get("image")], profile.n_eval_samples or 0)
    chosen = {"train": train[: profile.n_train_samples], "val": held[: profile.n_eval_samples]}
    base = sources.image_base(profile)
    names = sorted({Path(r["image"]).name for part in chosen.values() for r in part})
    fetch_all([(image_url(base, None, "train2017", n), image_dir / n) for n in names],
              desc="LLaVA-Instruct images (COCO train2017)")
    root.mkdir(parents=True, exist_ok=True)
    for name, records in chosen.items():
        kept = [dict(r, image=Path(r["image"]).name) for r in records if (image_dir / Path(r["image"]).name).exists()]
        out[name].write_text(json.dumps(kept))
    print(f"LLaVA-Instruct: {len(data)} records; {len(chosen['train'])} training and {len(chosen['val'])} held-out "
          f"conversations chosen (held out by image: no image of a held-out conversation is trained on)",
          flush=True)
    stamp_file.write_text(stamp)
    return out[split], image_dir


# --------------------------------------------------------------------------------------------- TinyStories
def pretrain_texts(profile, n: int) -> list[str]:
    """The first `n` non-empty stories, downloading only the shards they are in."""
    spec = profile.pretrain_text_dataset
    texts = []
    for path in _story_shards(profile, spec):
        for row in read_parquet_rows([path], ("text",), "tinystories", spec):
            if row["text"] and row["text"].strip():
                texts.append(row["text"])
                if len(texts) >= n:
                    return texts
    if not texts:
        raise SourceError(f"{sources.setting_label('tinystories', spec)}: no text found.")
    return texts


def _story_shards(profile, spec: str):
    if sources.is_local(spec):
        yield from sources.parquet_files(sources.source_folder(profile, "tinystories"), "data/train-*.parquet",
                                         "tinystories", spec)
        return
    for k in range(10_000):  # shard by shard: data/train-00000-of-000NN-<hash>.parquet, ...
        try:
            folder = sources.hub_snapshot("tinystories", spec, [f"data/train-{k:05d}-of-*.parquet"])
        except SourceError:
            if k == 0:
                raise
            return
        found = sorted(folder.glob(f"data/train-{k:05d}-of-*.parquet"))
        if not found:
            if k == 0:
                raise SourceError(f"{sources.setting_label('tinystories', spec)}: no data/train-*.parquet in "
                                  f"{folder}.")
            return
        yield found[0]


# ------------------------------------------------------------------------------------------------- POPE
_COCO_NAME = re.compile(r"(?:COCO_[a-z]+\d{4}_)?0*(\d+)(?:\.(?:jpg|jpeg|png))?", re.IGNORECASE)


def coco_image_id(name) -> int | None:
    """The COCO image id in any of its spellings, None if `name` is not one: POPE's ``COCO_val2014_000000310196``
    (with or without ``.jpg``), train2017's ``000000310196.jpg`` (also inside a path such as
    ``coco/train2017/000000310196.jpg``) and a bare id (``310196``). val2014 and train2017 share the numeric ids
    (hub_formats §12), so one id names one image in both."""
    if isinstance(name, bool):
        return None
    if isinstance(name, int):
        return name
    match = _COCO_NAME.fullmatch(Path(str(name)).name)
    return int(match.group(1)) if match else None


def _pope_selection(profile, n: int, columns: tuple[str, ...]):
    """The rows of the `n` questions POPE is asked (``n // 3`` per category, in file order), with `columns` only."""
    spec = profile.pope_dataset
    files = sources.parquet_files(sources.source_folder(profile, "pope"), "data/test-*.parquet", "pope", spec)
    per_category = {c: 0 for c in POPE_CATEGORIES}
    quota = max(1, n // len(POPE_CATEGORIES))

    def wanted(row):
        return per_category.get(row["category"], quota) < quota

    for row in read_parquet_rows(files, columns, "pope", spec, where=wanted):
        per_category[row["category"]] += 1
        yield row
        if all(v >= quota for v in per_category.values()):
            return


def pope_image_ids(profile, n: int | None = None) -> set[int]:
    """The COCO image ids of the first `n` POPE questions (default ``profile.n_pope_questions``), exactly those
    :func:`pope_questions` asks, read from the ``image_source`` column without decoding any image. Stages 02 and
    03 leave these images out of training (``helpers.stages.drop_pope_images``)."""
    n = profile.n_pope_questions if n is None else n
    if not n or not profile.pope_dataset:
        return set()
    ids = set()
    for row in _pope_selection(profile, n, ("category", "image_source")):
        image_id = coco_image_id(row["image_source"] or "")
        if image_id is None:
            raise SourceError(f"{sources.setting_label('pope', profile.pope_dataset)}: image_source "
                              f"{row['image_source']!r} names no COCO image (expected COCO_val2014_<12 digits>), so "
                              "its image could not be kept out of training.")
        ids.add(image_id)
    return ids


class _QuestionsCache:
    """An evaluation's questions prepared once under `root` (questions.json + the settings they were made with)."""

    def __init__(self, root: Path, spec, n: int):
        self.out, self.stamp_file = root / "questions.json", root / "settings.json"
        self.stamp = _stamp(source=spec, revision=_revision(spec), n=n)
        self.rows = self._load(json.loads(self.out.read_text())) \
            if _fresh(self.stamp_file, self.stamp, self.out) else None

    @staticmethod
    def _load(rows: list[dict]) -> list[dict]:
        return [dict(r, image=Path(r["image"])) for r in rows]

    def save(self, rows: list[dict]) -> list[dict]:
        self.out.write_text(json.dumps(rows, indent=1))
        self.stamp_file.write_text(self.stamp)
        return self._load(rows)



def pope_questions(profile, paths, n: int) -> list[dict]:
    """`n` POPE questions (``n // 3`` per category, in file order) with their image saved once to disk.

    Returns ``[{"question", "answer", "category", "image": Path, "question_id"}]``."""
    spec = profile.pope_dataset
    root = paths.root / "data" / "pope"
    cached = _QuestionsCache(root, spec, n)
    if cached.rows is not None:
        return cached.rows
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for row in _pope_selection(profile, n, POPE_COLUMNS + ("question_id", "image_source")):
        image = row["image"] or {}
        name = f"{row.get('image_source') or row['question_id']}.jpg"
        target = root / "images" / name
        if not target.exists() and image.get("bytes"):
            part = target.with_name(name + ".part")
            part.write_bytes(image["bytes"])
            part.replace(target)
        rows.append({"question": row["question"], "answer": row["answer"].strip().lower(),
                     "category": row["category"], "image": str(target), "question_id": row.get("question_id")})
    return cached.save(rows)


# ----------------------------------------------------------------------------------------------- MMStar
def spread_over(groups: dict, n: int) -> list:
    """Up to `n` items taken in turn from each group (each group in its own order): as even as the groups allow."""
    queues = [list(groups[key]) for key in sorted(groups)]
    picked, k = [], 0
    while len(picked) < n and any(k < len(q) for q in queues):
        picked += [q[k] for q in queues if k < len(q)][: n - len(picked)]
        k += 1
    return picked


def mmstar_questions(profile, paths, n: int) -> list[dict]:
    """`n` MMStar questions spread over its categories (in turn, each category in file order) with their image saved
    once under ``data/mmstar/images/``. The options are inside the question text (``...\nOptions: A: ..., B: ...``).

    Returns ``[{"question", "answer" (a letter A-D), "category", "image": Path, "index"}]``."""
    spec = profile.mmstar_dataset
    root = paths.root / "data" / "mmstar"
    cached = _QuestionsCache(root, spec, n)
    if cached.rows is not None:
        return cached.rows
    files = [sources.source_file(profile, "mmstar", MMSTAR_FILE)]
    by_category: dict[str, list] = {}
    for row in read_parquet_rows(files, ("index", "category"), "mmstar", spec):
        by_category.setdefault(row["category"], []).append(row["index"])
    chosen = set(spread_over(by_category, n))
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows, skipped = [], 0
    for row in read_parquet_rows(files, MMSTAR_COLUMNS, "mmstar", spec, where=lambda r: r["index"] in chosen):
        data, answer = (row["image"] or {}).get("bytes"), (row["answer"] or "").strip().upper()
        if not data or answer not in ("A", "B", "C", "D"):
            skipped += 1
            continue
        target = root / "images" / (f"{row['index']}" + (".png" if data.startswith(b"\x89PNG") else ".jpg"))
        if not target.exists():
            part = target.with_name(target.name + ".part")
            part.write_bytes(data)
            part.replace(target)
        rows.append({"question": row["question"], "answer": answer, "category": row["category"],
                     "image": str(target), "index": row["index"]})
    if not rows:
        raise SourceError(f"{sources.setting_label('mmstar', spec)}: none of the {len(chosen)} chosen rows of "
                          f"{files[0]} has an image and an answer A-D; expected {sources.SOURCES['mmstar'].what}.")
    if skipped:
        print(f"MMStar: {skipped} of {len(chosen)} chosen questions skipped (no image bytes or no answer A-D)")
    return cached.save(rows)
