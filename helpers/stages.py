"""What the stages share and need: the data each reads (the synthetic world, the tokenizer, captions and
conversations with POPE's images left out) and each earlier stage's output, made on the spot (with a notice) when
it is missing and the profile allows it, so a notebook also works on its own.

Each stage is written once, in its notebook's cells; an earlier stage that is missing is made by running its notebook
here (``helpers.course.run_notebook``)."""
from __future__ import annotations

import json

import torch

from helpers.config import Paths
from helpers.course import run_notebook
from helpers.data.chat_template import render
from helpers.data.hub_data import coco_caption_files, coco_image_id, llava_instruct_files, pope_image_ids
from helpers.data.multimodal_data import read_coco_captions, read_llava_instruct
from helpers.data.sources import describe, model_path
from helpers.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from helpers.data.world import build_world
from helpers.planning.time_plan import detect_gpu, plan_time
from helpers.train.pretrain import read_corpus
from helpers.views import reporting


def _notice(text: str):
    print(f"NOTICE: {text}")


class MissingStageError(RuntimeError):
    """An earlier stage's output is missing and the profile does not train missing stages on the spot."""


# stage -> (the notebook that makes it, the tag of its last cell to run)
STAGE_NOTEBOOKS = {"pretrain": ("01_pretrain_phi", "evaluate"), "vision_tower": ("02_projection", "vision-tower"),
                   "projection": ("02_projection", "evaluate"), "instruct": ("03_qlora_instruct", "evaluate")}


def stage_time_estimate(profile, stage: str) -> str:
    """How long training `stage` here would take, in words: CPU minutes in tiny; on a GPU of the time plan's table,
    its plan for stages 02 and 03 at the current settings; otherwise what is known."""
    if profile.world is not None:
        return "a few minutes on 2 CPU cores"
    gpu = detect_gpu()
    if gpu is None or stage not in ("projection", "instruct"):
        return "hours on a GPU (its notebook prints the time plan for the GPU it finds)"
    plan = plan_time(profile, stage, gpu)
    return f"about {plan.hours:.1f} h on this {gpu} at the current settings (helpers.planning.time_plan)"


def train_missing(profile, paths: Paths, stage: str, problem: str) -> None:
    """Run the notebook that makes `stage` (an earlier stage), here in this process with this profile and output
    folder, when ``profile.train_missing_stages`` allows it; otherwise stop and say what is missing, how long training
    it would take and how to ask for it."""
    name, last_cell = STAGE_NOTEBOOKS[stage]
    notebook = f"{name}.ipynb"
    estimate = stage_time_estimate(profile, stage)
    if not profile.train_missing_stages:
        raise MissingStageError(
            f"{problem}. It is made by {notebook}; training it here would take {estimate}. Run {notebook} first "
            f"(with the same OUTPUT_DIR), or ask for it explicitly with SETTINGS={{'train_missing_stages': True}} "
            f"(or MMPHI_SETTINGS=train_missing_stages=true).")
    _notice(f"{problem}: running {notebook}'s stage now ({estimate}).")
    run_notebook(name, stop_after=last_cell, PROFILE=profile, OUTPUT_DIR=paths.root.parent)


def show_setup(profile, paths: Paths) -> None:
    """What a notebook runs with: the profile, where its outputs go and (full) where every source comes from."""
    print(f"profile: {profile.name}   outputs: {paths.root.resolve()}")
    if profile.world is not None and torch.cuda.is_available():
        print(f"A GPU is here ({torch.cuda.get_device_name()}): this is still the tiny profile (minutes). The full "
              "course (Phi-2, CLIP and the real data sets; hours per stage) starts only when asked for: "
              'PROFILE = "full" in the parameters cell, or MMPHI_PROFILE=full.')
    if profile.world is None:
        reporting.show_table(describe(profile), ["setting", "value", "kind", "revision"])


# Every training stage checkpoints into <output>/<profile>/<stage>/trainer/checkpoint-<step> (every 25 % of its steps
# unless save_steps says otherwise; 0 = never) and by default resumes from the latest valid checkpoint made with the
# same settings (resume=False: start afresh; a path: that checkpoint). See helpers.train.checkpointing.


# ------------------------------------------------------------------------------------------------ data
def ensure_world(profile, paths: Paths):
    """Tiny: the synthetic world's files (generated once). Full: None (data comes from the Hub)."""
    if profile.world is None:
        return None

    return build_world(paths.world, profile.world)


def ensure_tokenizer(profile, paths: Paths):
    if profile.tokenizer_checkpoint:  # Phi-2's own tokenizer, from the phi2 source (Hub id or local path)
        return load_tokenizer(model_path(profile, "phi2"))
    world = ensure_world(profile, paths)
    made_for = paths.tokenizer / "world_settings.json"  # the tokenizer is trained on this world's text
    if (paths.tokenizer / "tokenizer.json").exists() and made_for.exists() \
            and made_for.read_text() == world.stamp.read_text():
        return load_tokenizer(paths.tokenizer)
    # tiny: the pretraining corpus plus the training conversations as the chat template renders them, so the
    # text around <image> ("\nWhat ...") is tokenized as in training
    train, _ = instruct_records(profile, paths, "train")
    texts = read_corpus(world.corpus) + [render(r.messages) for r in train]
    tok = train_bpe_tokenizer(texts, vocab_size=min(400, profile.phi.vocab_size), out_dir=paths.tokenizer)
    made_for.write_text(world.stamp.read_text())
    return tok


def caption_records(profile, paths, split: str):
    if profile.world is not None:
        world = ensure_world(profile, paths)
        return read_coco_captions(world.captions(split), world.images(split))

    annotation_file, image_dir = coco_caption_files(profile, paths, split)  # n_train_samples *images*
    records, report = read_coco_captions(annotation_file, image_dir)
    if split == "train":
        records = drop_pope_images(profile, records, report, "stage 02's training captions", "captions")
    return records, report


def instruct_records(profile, paths, split: str):
    if profile.world is not None:
        world = ensure_world(profile, paths)
        return read_llava_instruct(world.instruct(split), world.images(split))

    json_file, image_dir = llava_instruct_files(profile, paths, split)  # split by image, sizes from the profile
    records, report = read_llava_instruct(json_file, image_dir)
    if split == "train":
        records = drop_pope_images(profile, records, report, "stage 03's training conversations", "conversations")
    return records, report


def drop_pope_images(profile, records, report, where: str, unit: str):
    """`records` without those about an image POPE is asked about (``hub_data.pope_image_ids``: COCO val2014 ids,
    most of them also train2017 images), so POPE measures images the model has never been trained on.

    Applied to the records read for training, after whatever ``hub_data`` prepared or cached, so no earlier
    preparation can bring them back. What was removed is printed and kept in ``report.pope_heldout``
    ({"evaluated_images", "images", <unit>}), which the stages record as ``pope_heldout_removed``."""
    evaluated = pope_image_ids(profile)
    if not evaluated:
        return records
    kept, removed = [], []
    for r in records:
        ids = {coco_image_id(r.meta.get("image_id")), coco_image_id(r.image.name)}
        (removed if ids & evaluated else kept).append(r)
    images = {r.image.name for r in removed}
    report.pope_heldout = {"evaluated_images": len(evaluated), "images": len(images), unit: len(removed)}
    print(f"POPE: removed {len(images)} images ({len(removed)} {unit}) of the {len(evaluated)} evaluated POPE "
          f"images from {where}", flush=True)
    return kept


# ------------------------------------------------------------------------------------ earlier stages' outputs
def ensure_base_lm(profile, paths: Paths):
    """Where the stage-02 LM comes from: Phi-2 (full: the ``phi2`` source) or notebook 01's LM (tiny), which is run
    first when missing or made with another tokenizer (and the profile allows it, see :func:`train_missing`)."""
    if profile.llm_checkpoint:
        return model_path(profile, "phi2")
    tok = ensure_tokenizer(profile, paths)
    if not (paths.base_lm / "config.json").exists():
        train_missing(profile, paths, "pretrain", f"no pretrained base LM at {paths.base_lm}")
    elif load_tokenizer_vocab(paths.base_lm) != tok.get_vocab():
        train_missing(profile, paths, "pretrain",
                      f"the base LM at {paths.base_lm} was trained with another tokenizer")
    return paths.base_lm


def load_tokenizer_vocab(path) -> dict | None:
    try:
        return load_tokenizer(path).get_vocab()
    except (OSError, ValueError):
        return None


def _vision_matches(saved: dict, profile) -> bool:
    """Whether a saved vision config fits the profile: image and patch size fix the number of image tokens; the tiny
    tower's width and depth are profile settings too (the full one's come from its checkpoint)."""
    keys = ("image_size", "patch_size") if profile.clip_checkpoint else \
        ("image_size", "patch_size", "hidden_size", "num_hidden_layers")
    return all(saved.get(k) == getattr(profile.vision, k) for k in keys)


def ensure_projection(profile, paths: Paths):
    config = paths.projection / "config.json"
    if not config.exists():
        problem = f"no stage-02 checkpoint at {paths.projection}"
    elif not _vision_matches(json.loads(config.read_text())["vision_config"], profile):
        problem = f"the stage-02 checkpoint at {paths.projection} was built for other settings"
    else:
        return paths.projection
    train_missing(profile, paths, "projection", problem)
    return paths.projection


def ensure_assistant(profile, paths: Paths):
    if not (paths.assistant / "config.json").exists():
        train_missing(profile, paths, "instruct", f"no stage-03 assistant at {paths.assistant}")
    return paths.assistant
