"""What the stages share and need: the data each reads (the synthetic world, the tokenizer, captions and
conversations with POPE's images left out) and each earlier stage's output, made on the spot (with a notice) when
it is missing and the profile allows it, so a notebook also works on its own.

Stages 01 and 02 are still functions here (``pretrain_stage``, ``vision_tower_stage``, ``projection_stage``);
stage 03 is written once, in notebook 03's cells, and run from elsewhere with ``helpers.course.run_notebook``."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch

from . import reporting
from .chat_template import prompt_for_next_answer, render
from .config import Paths
from .course import run_notebook
from .hub_data import coco_caption_files, coco_image_id, llava_instruct_files, pope_image_ids
from .inference import generate_answers
from .modeling import image_processor, make_processor
from .multimodal_data import CAPTION_INSTRUCTION, read_coco_captions, read_llava_instruct
from .precision import current, device_map
from .pretrain import load_text_documents, mean_loss, pretrain, read_corpus, text_answer_accuracy, uniform_loss
from .projection import build_projection_model, feature_table, make_dataset, mean_conversation_loss, train_projector
from .sources import describe, model_path
from .time_plan import detect_gpu, plan_time, training_callbacks
from .tokenizer import load_tokenizer, train_bpe_tokenizer
from .training import free_accelerator_memory, loss_history, reset_peak_memory, run_figures, set_cpu_threads
from .vision import retrieval_accuracy, save_vision_tower, train_tiny_clip
from .world import build_world, described_questions, vocabulary


@dataclass
class StageResult:
    metrics: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)
    objects: dict = field(default_factory=dict)


def _notice(text: str):
    print(f"NOTICE: {text}")


class MissingStageError(RuntimeError):
    """An earlier stage's output is missing and the profile does not train missing stages on the spot."""


STAGE_NOTEBOOKS = {"pretrain": "01_pretrain_phi.ipynb", "vision_tower": "02_projection.ipynb",
                   "projection": "02_projection.ipynb", "instruct": "03_qlora_instruct.ipynb"}


def stage_time_estimate(profile, stage: str) -> str:
    """How long training `stage` here would take, in words: CPU minutes in tiny; on a GPU of the time plan's table,
    its plan for stages 02 and 03 at the current settings; otherwise what is known."""
    if profile.world is not None:
        return "a few minutes on 2 CPU cores"
    gpu = detect_gpu()
    if gpu is None or stage not in ("projection", "instruct"):
        return "hours on a GPU (its notebook prints the time plan for the GPU it finds)"
    plan = plan_time(profile, stage, gpu)
    return f"about {plan.hours:.1f} h on this {gpu} at the current settings (helpers.time_plan)"


def train_missing(profile, stage: str, problem: str, run) -> None:
    """Run `run()` (an earlier stage) when ``profile.train_missing_stages`` allows it; otherwise stop and say what is
    missing, how long training it would take and how to ask for it."""
    notebook = STAGE_NOTEBOOKS[stage]
    estimate = stage_time_estimate(profile, stage)
    if not profile.train_missing_stages:
        raise MissingStageError(
            f"{problem}. It is made by {notebook}; training it here would take {estimate}. Run {notebook} first "
            f"(with the same OUTPUT_DIR), or ask for it explicitly with SETTINGS={{'train_missing_stages': True}} "
            f"(or MMPHI_SETTINGS=train_missing_stages=true).")
    _notice(f"{problem}: running {notebook}'s stage now ({estimate}).")
    run()


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
# same settings (resume=False: start afresh; a path: that checkpoint). See helpers.checkpointing.


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


# --------------------------------------------------------------------------------------------- stage 01
TEXT_PROBE_SCENES = 100  # fresh scenes whose caption is given in words, then one question of each type


def pretrain_stage(profile, paths: Paths, resume=None, save_steps: int | None = None) -> StageResult:
    set_cpu_threads()
    start = time.perf_counter()
    tok = ensure_tokenizer(profile, paths)
    documents = load_text_documents(profile, paths)
    reset_peak_memory()
    trainer, model, heldout, initial = pretrain(profile, paths, tok, documents, resume=resume, save_steps=save_steps)
    if not trainer.is_world_process_zero():  # several processes (accelerate launch): rank 0 reports and saves
        return StageResult({"steps": trainer.state.global_step}, {"train loss": loss_history(trainer)})
    final = mean_loss(model, heldout)
    metrics = {"initial_heldout_loss": initial, "final_heldout_loss": final,
               "uniform_loss": uniform_loss(model.config.vocab_size),
               "target_loss": initial - 1.0, "reached_target": final <= initial - 1.0,
               "steps": trainer.state.global_step, "n_documents": len(documents),
               "n_heldout_blocks": len(heldout[0]), "block_size": int(heldout[0].shape[1]),
               "parameters": sum(p.numel() for p in model.parameters()), **run_figures(trainer)}
    if profile.world is not None:  # tiny: can it answer from a text description (the skill 02 and 03 build on)?
        probes = described_questions(TEXT_PROBE_SCENES, profile.world.world_seed * 1000 + 4,
                                     vocabulary(profile.world.world_seed))
        qa = text_answer_accuracy(model, tok, probes)
        metrics.update(text_qa_accuracy=qa["accuracy"], text_qa_accuracy_by_type=qa["accuracy_by_type"],
                       n_text_qa=len(probes))
    if profile.llm_checkpoint:  # full: Phi-2's own loss on the very same held-out blocks
        from transformers import AutoModelForCausalLM

        phi2 = AutoModelForCausalLM.from_pretrained(model_path(profile, "phi2"), dtype=current().dtype,
                                                    attn_implementation=current().attention, device_map=device_map())
        metrics["phi2_heldout_loss"] = mean_loss(phi2, heldout, batch_size=4)
        del phi2

        free_accelerator_memory()
    model.save_pretrained(paths.base_lm)
    tok.save_pretrained(paths.base_lm)
    metrics["seconds"] = time.perf_counter() - start
    reporting.write_metrics(paths.metrics, "01_pretrain", metrics)
    return StageResult(metrics, {"train loss": loss_history(trainer)}, objects={"model": model, "tok": tok,
                                                                            "heldout": heldout})


def ensure_base_lm(profile, paths: Paths):
    if profile.llm_checkpoint:
        return profile.llm_checkpoint
    tok = ensure_tokenizer(profile, paths)
    if not (paths.base_lm / "config.json").exists():
        train_missing(profile, "pretrain", f"no pretrained base LM at {paths.base_lm}",
                      lambda: pretrain_stage(profile, paths))
    elif load_tokenizer_vocab(paths.base_lm) != tok.get_vocab():
        train_missing(profile, "pretrain", f"the base LM at {paths.base_lm} was trained with another tokenizer",
                      lambda: pretrain_stage(profile, paths))
    return paths.base_lm


def load_tokenizer_vocab(path) -> dict | None:
    try:
        return load_tokenizer(path).get_vocab()
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------ vision tower
def vision_tower_stage(profile, paths: Paths, resume=None, save_steps: int | None = None) -> StageResult:
    """Tiny: train a small CLIP contrastively on the training captions. Full: nothing to do (downloaded)."""
    if profile.clip_checkpoint:
        return StageResult({"vision_tower": profile.clip_checkpoint})

    set_cpu_threads()
    start = time.perf_counter()
    tok = ensure_tokenizer(profile, paths)
    train, _ = caption_records(profile, paths, "train")
    val, _ = caption_records(profile, paths, "val")
    pairs = [(str(r.image), r.messages[1]["content"]) for r in train]
    val_pairs = [(str(r.image), r.messages[1]["content"]) for r in val]
    trainer, clip = train_tiny_clip(profile, paths, tok, pairs, resume=resume, save_steps=save_steps)
    save_vision_tower(clip, profile, paths)
    metrics = {"heldout_retrieval_top1_batch64": retrieval_accuracy(clip, tok, val_pairs,
                                                                    image_processor(profile.vision)),
               "chance": 1 / 64, "steps": trainer.state.global_step, "seconds": time.perf_counter() - start}
    reporting.write_metrics(paths.metrics, "02_vision_tower", metrics)
    return StageResult(metrics, {"contrastive loss": loss_history(trainer)})


def _vision_matches(saved: dict, profile) -> bool:
    """Whether a saved vision config fits the profile: image and patch size fix the number of image tokens; the tiny
    tower's width and depth are profile settings too (the full one's come from its checkpoint)."""
    keys = ("image_size", "patch_size") if profile.clip_checkpoint else \
        ("image_size", "patch_size", "hidden_size", "num_hidden_layers")
    return all(saved.get(k) == getattr(profile.vision, k) for k in keys)


def ensure_vision_tower(profile, paths: Paths):
    if profile.clip_checkpoint:
        return
    config = paths.clip / "config.json"
    if not config.exists():
        problem = f"no vision tower at {paths.clip}"
    elif not _vision_matches(json.loads(config.read_text()), profile):
        problem = f"the vision tower at {paths.clip} was built for other settings"
    else:
        return
    train_missing(profile, "vision_tower", problem, lambda: vision_tower_stage(profile, paths))


# --------------------------------------------------------------------------------------------- stage 02
def projection_stage(profile, paths: Paths, resume=None, save_steps: int | None = None) -> StageResult:
    set_cpu_threads()
    start = time.perf_counter()
    ensure_base_lm(profile, paths)
    ensure_vision_tower(profile, paths)
    tok = ensure_tokenizer(profile, paths)
    train, train_report = caption_records(profile, paths, "train")
    val, _ = caption_records(profile, paths, "val")
    model, image_proc = build_projection_model(profile, paths, tok)
    tower = model.model.vision_tower
    t0 = time.perf_counter()
    feats, index = feature_table(tower, image_proc, train, profile.vision_feature_layer, paths.features / "train")
    vfeats, vindex = feature_table(tower, image_proc, val, profile.vision_feature_layer, paths.features / "val")
    cache_seconds = time.perf_counter() - t0
    dataset = make_dataset(train, tok, profile, feats, index, profile.projection)
    val_dataset = make_dataset(val, tok, profile, vfeats, vindex, profile.projection)
    initial = mean_conversation_loss(model, val_dataset, tok)
    reset_peak_memory()
    # on a GPU: the memory and time plans for it, printed before training, and the planned vs measured s/step + ETA
    trainer = train_projector(model, dataset, tok, profile, paths, resume=resume, save_steps=save_steps,
                              callbacks=training_callbacks(profile, "projection", dataset))
    if not trainer.is_world_process_zero():
        return StageResult({"steps": trainer.state.global_step}, {"train loss": loss_history(trainer)})
    final = mean_conversation_loss(model, val_dataset, tok)

    processor = make_processor(tok, profile.vision)
    seen, samples = set(), []
    for r in val:
        if r.image in seen or len(samples) >= 8:
            continue
        seen.add(r.image)
        samples.append(r)
    from PIL import Image

    prompt = prompt_for_next_answer([], CAPTION_INSTRUCTION, tok.eos_token)
    answers = generate_answers(model, processor, [Image.open(r.image).convert("RGB") for r in samples],
                               [prompt] * len(samples), max_new_tokens=profile.max_new_tokens * 3)
    rows = [{"image": r.image.name, "target": r.messages[1]["content"], "generated": a,
             "exact": a.strip() == r.messages[1]["content"].strip()} for r, (a, _) in zip(samples, answers)]
    model.save_pretrained(paths.projection)
    processor.save_pretrained(paths.projection)
    metrics = {"initial_heldout_caption_loss": initial, "final_heldout_caption_loss": final,
               "steps": trainer.state.global_step, "n_train_captions": len(dataset),
               "skipped_records": dict(train_report.skipped), "feature_cache_seconds": cache_seconds,
               "n_feature_images": len(index) + len(vindex),
               "examples_seen": trainer.state.global_step * profile.projection.batch_size
               * profile.projection.grad_accum * trainer.args.world_size,
               "sample_exact_captions": sum(r["exact"] for r in rows) / max(len(rows), 1),
               **run_figures(trainer), "seconds": time.perf_counter() - start}
    if train_report.pope_heldout:  # the evaluated POPE images left out of training (drop_pope_images)
        metrics["pope_heldout_removed"] = train_report.pope_heldout
    reporting.write_metrics(paths.metrics, "02_projection", metrics)
    return StageResult(metrics, {"train loss": loss_history(trainer)}, rows,
                       {"model": model, "processor": processor, "val_dataset": val_dataset, "val": val})


def ensure_projection(profile, paths: Paths):
    config = paths.projection / "config.json"
    if not config.exists():
        problem = f"no stage-02 checkpoint at {paths.projection}"
    elif not _vision_matches(json.loads(config.read_text())["vision_config"], profile):
        problem = f"the stage-02 checkpoint at {paths.projection} was built for other settings"
    else:
        return paths.projection
    train_missing(profile, "projection", problem, lambda: projection_stage(profile, paths))
    return paths.projection


# --------------------------------------------------------------------------------------------- stage 03
def ensure_assistant(profile, paths: Paths):
    if not (paths.assistant / "config.json").exists():
        train_missing(profile, "instruct", f"no stage-03 assistant at {paths.assistant}",
                      lambda: run_notebook("03_qlora_instruct", stop_after="evaluate", PROFILE=profile,
                                           OUTPUT_DIR=paths.root.parent))
    return paths.assistant
