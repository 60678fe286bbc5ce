"""The vision tower: openai/clip-vit-base-patch32 (full) or a small CLIP trained contrastively offline (tiny).

No pretrained CLIP can be downloaded offline, so the tiny profile trains a small ``CLIPModel`` (same
architecture, fewer/narrower layers) with CLIP's own objective – matching images and their captions in a batch –
on the synthetic world's COCO-format captions. Only its vision half is kept and frozen from then on.
"""
from __future__ import annotations

import os

import torch
from PIL import Image
from torch.utils.data import Dataset

from helpers.data.sources import SourceError, model_path, setting_label
from helpers.models.modeling import image_processor, new_clip, vision_features, vision_tower_from_clip
from helpers.train.training import CourseTrainer, train, training_arguments


class CaptionImagePairs(Dataset):
    def __init__(self, pairs: list[tuple[str, str]], pixel_cache: dict[str, torch.Tensor], tok, max_length: int):
        self.pairs, self.pixels, self.tok, self.max_length = pairs, pixel_cache, tok, max_length

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        image_path, text = self.pairs[i]
        ids = self.tok(text, add_special_tokens=False)["input_ids"][: self.max_length - 1] + [self.tok.eos_token_id]
        return {"input_ids": ids, "pixel_values": self.pixels[image_path]}


class ClipCollator:
    """Pads captions; CLIP's text tower pools at the *first* EOS, so padding with EOS (= pad) is harmless."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, examples):
        longest = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), longest), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(examples):
            ids[i, : len(e["input_ids"])] = torch.as_tensor(e["input_ids"])
            mask[i, : len(e["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "return_loss": True,
                "pixel_values": torch.stack([e["pixel_values"] for e in examples])}


def load_pixels(paths: list[str], processor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Pixel tensors of the distinct images; an image that cannot be decoded is left out (callers skip it)."""
    out = {}
    unique = list(dict.fromkeys(paths))
    for i in range(0, len(unique), batch_size):
        chunk = [(p, im) for p in unique[i: i + batch_size] if (im := _decoded(p)) is not None]
        if chunk:
            pixels = processor(images=[im for _, im in chunk], return_tensors="pt")["pixel_values"]
            out.update(zip([p for p, _ in chunk], pixels))
    return out


def train_tiny_clip(profile, paths, tok, pairs: list[tuple[str, str]], callbacks=None, resume=None,
                    save_steps=None):
    """Contrastive training of a small CLIP on (image path, caption) pairs. Returns (trainer, clip).
    Checkpoints and `resume` as in ``helpers.train.training.train``."""
    processor = image_processor(profile.vision)
    pixels = load_pixels([p for p, _ in pairs], processor)
    kept = [pair for pair in pairs if pair[0] in pixels]
    if len(kept) < len(pairs):
        print(f"tiny CLIP: skipped {len(pairs) - len(kept)} caption pairs with an unreadable image", flush=True)
        pairs = kept
    clip = new_clip(profile.vision, tok, profile.clip.max_length, seed=profile.seed)
    args = training_arguments(profile.clip, paths.stage_dir("vision_tower") / "trainer", profile.seed,
                              n_examples=len(pairs), save_steps=save_steps)
    dataset = CaptionImagePairs(pairs, pixels, tok, profile.clip.max_length)
    trainer = CourseTrainer(model=clip, args=args, train_dataset=dataset,
                            data_collator=ClipCollator(tok.pad_token_id), callbacks=callbacks)
    train(trainer, resume)
    return trainer, clip


@torch.no_grad()
def retrieval_accuracy(clip, tok, pairs: list[tuple[str, str]], processor, batch: int = 64) -> float:
    """Image->caption top-1 accuracy within batches of `batch` held-out pairs (chance = 1/batch)."""
    clip.eval()
    hits, total = 0, 0
    for i in range(0, len(pairs) - batch + 1, batch):
        chunk = pairs[i: i + batch]
        pixels = torch.stack(list(load_pixels([p for p, _ in chunk], processor).values()))
        enc = ClipCollator(tok.pad_token_id)([{"input_ids": tok(c, add_special_tokens=False)["input_ids"]
                                               + [tok.eos_token_id], "pixel_values": pixels[0]} for _, c in chunk])
        out = clip(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels)
        hits += int((out.logits_per_image.argmax(-1) == torch.arange(len(chunk))).sum())
        total += len(chunk)
    return hits / max(total, 1)


def load_vision_tower(profile, paths):
    """The frozen vision tower of the course (CLIPVisionModel) and its image processor.

    Full: the ``clip`` source (its own ``preprocessor_config.json``), checked against the profile's vision settings
    (image size and patch size fix the number of image tokens). Tiny: the CLIP trained in notebook 02."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    if not profile.clip_checkpoint:
        tower = CLIPVisionModel.from_pretrained(str(paths.clip))
        return tower.requires_grad_(False).eval(), image_processor(profile.vision)

    source = model_path(profile, "clip")
    tower = CLIPVisionModel.from_pretrained(source)
    got = (tower.config.image_size, tower.config.patch_size)
    if got != (profile.vision.image_size, profile.vision.patch_size):
        raise SourceError(f"{setting_label('clip', profile.clip_checkpoint)}: the checkpoint at {source} has image "
                          f"size {got[0]} and patch size {got[1]}; the profile expects {profile.vision.image_size} "
                          f"and {profile.vision.patch_size} (vision.image_size / vision.patch_size settings).")
    return tower.requires_grad_(False).eval(), CLIPImageProcessor.from_pretrained(source)


def save_vision_tower(clip, profile, paths):
    tower = vision_tower_from_clip(clip)
    tower.save_pretrained(paths.clip)
    image_processor(profile.vision).save_pretrained(paths.clip)
    return tower


def _decoded(path):
    """The image as RGB, or None when it cannot be decoded (truncated or corrupt file)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        return None


@torch.no_grad()
def cache_features(tower, processor, image_paths: list[str], layer: int, cache_file, batch_size: int = 128,
                   progress: bool = True, unreadable: list | None = None) -> torch.Tensor:
    """Vision features for every image, computed once and kept in a safetensors file (CLS dropped).

    The cache is keyed by the images, the tower's config and weights and the layer; a stale cache is never reused.
    An image that cannot be decoded gets a row of zeros and its path is appended to `unreadable` (also when the
    cache is reused: the list is stored in the file's metadata); callers must skip it.
    """
    import hashlib
    import json

    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    weights = sum(float(p.double().sum()) for p in tower.parameters())  # a stale tower must not reuse a cache
    fingerprint = f"{tower.config.to_json_string()}|{layer}|{weights:.10e}|" + "\n".join(map(str, image_paths))
    key = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    cache_file = cache_file.with_name(f"{cache_file.stem}-{key}.safetensors")
    if cache_file.exists():
        return _load_cache(cache_file, unreadable)
    device = next(tower.parameters()).device
    dtype = next(tower.parameters()).dtype
    chunks, bad = [], []
    for i in tqdm(range(0, len(image_paths), batch_size), desc="caching vision features", disable=not progress):
        chunk = image_paths[i: i + batch_size]
        images = [_decoded(p) for p in chunk]
        bad += [p for p, im in zip(chunk, images) if im is None]
        good = [im for im in images if im is not None]
        feats = None
        if good:
            pixels = processor(images=good, return_tensors="pt")["pixel_values"].to(device, dtype)
            feats = vision_features(tower, pixels, layer).float().cpu()
        if len(good) < len(chunk):  # zero rows for the unreadable images keep the row order
            if feats is None:
                feats = _probe_shape(tower, processor, layer, device, dtype)
            it = iter(feats)
            rows = [next(it) if im is not None else torch.zeros_like(feats[0]) for im in images]
            feats = torch.stack(rows)
        chunks.append(feats)
    features = torch.cat(chunks)
    if bad:
        print(f"{len(bad)} of {len(image_paths)} images could not be decoded and are skipped, e.g. {bad[0]}",
              flush=True)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(cache_file.name + ".tmp")
    save_file({"features": features.half() if features.shape[-1] >= 512 else features}, str(tmp),
              metadata={"unreadable": json.dumps(bad)})
    os.replace(tmp, cache_file)  # a half-written cache is never picked up
    return _load_cache(cache_file, unreadable)


def _probe_shape(tower, processor, layer, device, dtype) -> torch.Tensor:
    """Features of one black image (only their shape is used, for a batch with no readable image)."""
    size = tower.config.image_size
    pixels = processor(images=[Image.new("RGB", (size, size))], return_tensors="pt")["pixel_values"]
    return vision_features(tower, pixels.to(device, dtype), layer).float().cpu()


def _load_cache(cache_file, unreadable: list | None) -> torch.Tensor:
    import json

    from safetensors import safe_open

    with safe_open(str(cache_file), "pt") as f:
        meta = f.metadata() or {}
        features = f.get_tensor("features")
    if unreadable is not None:
        unreadable.extend(json.loads(meta.get("unreadable", "[]")))
    return features
