"""The course's stages as functions: what each notebook runs, and what a later notebook runs on the spot when
an earlier stage's output is missing (with a notice), so every notebook also works opened on its own."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch

from . import reporting
from .config import Paths


@dataclass
class StageResult:
    metrics: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)
    objects: dict = field(default_factory=dict)


def _notice(text: str):
    print(f"NOTICE: {text}")


# Every training stage checkpoints into <output>/<profile>/<stage>/trainer/checkpoint-<step> (every 25 % of its steps
# unless save_steps says otherwise; 0 = never) and by default resumes from the latest valid checkpoint made with the
# same settings (resume=False: start afresh; a path: that checkpoint). See helpers.checkpointing.


# ------------------------------------------------------------------------------------------------ data
def ensure_world(profile, paths: Paths):
    """Tiny: the synthetic world's files (generated once). Full: None (data comes from the Hub)."""
    if profile.world is None:
        return None
    from .world import build_world

    return build_world(paths.world, profile.world)


def ensure_tokenizer(profile, paths: Paths):
    from .tokenizer import load_tokenizer, train_bpe_tokenizer

    if profile.tokenizer_checkpoint:
        return load_tokenizer(profile.tokenizer_checkpoint)
    world = ensure_world(profile, paths)
    made_for = paths.tokenizer / "world_settings.json"  # the tokenizer is trained on this world's text
    if (paths.tokenizer / "tokenizer.json").exists() and made_for.exists() \
            and made_for.read_text() == world.stamp.read_text():
        return load_tokenizer(paths.tokenizer)
    # tiny: the pretraining corpus plus the training conversations as the chat template renders them, so the
    # text around <image> ("\nWhat ...") is tokenized as in training
    from .chat_template import render
    from .pretrain import read_corpus

    train, _ = instruct_records(profile, paths, "train")
    texts = read_corpus(world.corpus) + [render(r.messages) for r in train]
    tok = train_bpe_tokenizer(texts, vocab_size=min(400, profile.phi.vocab_size), out_dir=paths.tokenizer)
    made_for.write_text(world.stamp.read_text())
    return tok


def caption_records(profile, paths, split: str):
    from .multimodal_data import read_coco_captions

    if profile.world is not None:
        world = ensure_world(profile, paths)
        return read_coco_captions(world.captions(split), world.images(split))
    from .hub_data import coco_caption_files

    annotation_file, image_dir = coco_caption_files(profile, paths, split)
    return read_coco_captions(annotation_file, image_dir, limit=profile.n_train_samples)


def instruct_records(profile, paths, split: str):
    from .multimodal_data import read_llava_instruct

    if profile.world is not None:
        world = ensure_world(profile, paths)
        return read_llava_instruct(world.instruct(split), world.images(split))
    from .hub_data import llava_instruct_files

    json_file, image_dir = llava_instruct_files(profile, paths, split)
    return read_llava_instruct(json_file, image_dir, limit=profile.n_train_samples)


# --------------------------------------------------------------------------------------------- stage 01
TEXT_PROBE_SCENES = 100  # fresh scenes whose caption is given in words, then one question of each type


def pretrain_stage(profile, paths: Paths, resume=None, save_steps: int | None = None) -> StageResult:
    from .pretrain import load_text_documents, mean_loss, pretrain, uniform_loss
    from .training import loss_history, set_cpu_threads

    set_cpu_threads()
    start = time.perf_counter()
    tok = ensure_tokenizer(profile, paths)
    documents = load_text_documents(profile, paths)
    trainer, model, heldout, initial = pretrain(profile, paths, tok, documents, resume=resume, save_steps=save_steps)
    if not trainer.is_world_process_zero():  # several processes (accelerate launch): rank 0 reports and saves
        return StageResult({"steps": trainer.state.global_step}, {"train loss": loss_history(trainer)})
    final = mean_loss(model, heldout)
    metrics = {"initial_heldout_loss": initial, "final_heldout_loss": final,
               "uniform_loss": uniform_loss(model.config.vocab_size),
               "target_loss": initial - 1.0, "reached_target": final <= initial - 1.0,
               "steps": trainer.state.global_step, "n_documents": len(documents),
               "n_heldout_blocks": len(heldout[0]), "block_size": int(heldout[0].shape[1]),
               "parameters": sum(p.numel() for p in model.parameters())}
    if profile.world is not None:  # tiny: can it answer from a text description (the skill 02 and 03 build on)?
        from .pretrain import text_answer_accuracy
        from .world import described_questions, vocabulary

        probes = described_questions(TEXT_PROBE_SCENES, profile.world.world_seed * 1000 + 4,
                                     vocabulary(profile.world.world_seed))
        qa = text_answer_accuracy(model, tok, probes)
        metrics.update(text_qa_accuracy=qa["accuracy"], text_qa_accuracy_by_type=qa["accuracy_by_type"],
                       n_text_qa=len(probes))
    if profile.llm_checkpoint:  # full: Phi-2's own loss on the very same held-out blocks
        from transformers import AutoModelForCausalLM

        from .projection import llm_dtype

        phi2 = AutoModelForCausalLM.from_pretrained(profile.llm_checkpoint, dtype=llm_dtype(),
                                                    device_map="auto" if torch.cuda.is_available() else None)
        metrics["phi2_heldout_loss"] = mean_loss(phi2, heldout, batch_size=4)
        del phi2
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
        _notice(f"no pretrained base LM at {paths.base_lm}: running stage 01 now (a few minutes in tiny mode).")
        pretrain_stage(profile, paths)
    elif load_tokenizer_vocab(paths.base_lm) != tok.get_vocab():
        _notice(f"the base LM at {paths.base_lm} was trained with another tokenizer: running stage 01 again.")
        pretrain_stage(profile, paths)
    return paths.base_lm


def load_tokenizer_vocab(path) -> dict | None:
    from .tokenizer import load_tokenizer

    try:
        return load_tokenizer(path).get_vocab()
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------ vision tower
def vision_tower_stage(profile, paths: Paths, resume=None, save_steps: int | None = None) -> StageResult:
    """Tiny: train a small CLIP contrastively on the training captions. Full: nothing to do (downloaded)."""
    if profile.clip_checkpoint:
        return StageResult({"vision_tower": profile.clip_checkpoint})
    from .modeling import image_processor
    from .training import loss_history, set_cpu_threads
    from .vision import retrieval_accuracy, save_vision_tower, train_tiny_clip

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


def _vision_matches(saved: dict, spec) -> bool:
    keys = ("image_size", "patch_size", "hidden_size", "num_hidden_layers")
    return all(saved.get(k) == getattr(spec, k) for k in keys)


def ensure_vision_tower(profile, paths: Paths):
    if profile.clip_checkpoint:
        return
    config = paths.clip / "config.json"
    if not config.exists():
        _notice(f"no vision tower at {paths.clip}: training the tiny CLIP now.")
    elif not _vision_matches(json.loads(config.read_text()), profile.vision):
        _notice(f"the vision tower at {paths.clip} was built for other settings: retraining it.")
    else:
        return
    vision_tower_stage(profile, paths)


# --------------------------------------------------------------------------------------------- stage 02
def projection_stage(profile, paths: Paths, resume=None, save_steps: int | None = None) -> StageResult:
    from .inference import generate_answers
    from .chat_template import prompt_for_next_answer
    from .multimodal_data import CAPTION_INSTRUCTION
    from .projection import build_projection_model, feature_table, make_dataset, mean_conversation_loss, \
        train_projector
    from .training import loss_history, set_cpu_threads

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
    trainer = train_projector(model, dataset, tok, profile, paths, resume=resume, save_steps=save_steps)
    if not trainer.is_world_process_zero():
        return StageResult({"steps": trainer.state.global_step}, {"train loss": loss_history(trainer)})
    final = mean_conversation_loss(model, val_dataset, tok)

    from .modeling import make_processor

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
               "sample_exact_captions": sum(r["exact"] for r in rows) / max(len(rows), 1),
               "seconds": time.perf_counter() - start}
    reporting.write_metrics(paths.metrics, "02_projection", metrics)
    return StageResult(metrics, {"train loss": loss_history(trainer)}, rows,
                       {"model": model, "processor": processor, "val_dataset": val_dataset})


def ensure_projection(profile, paths: Paths):
    config = paths.projection / "config.json"
    if not config.exists():
        _notice(f"no stage-02 checkpoint at {paths.projection}: running stage 02 now.")
    elif not _vision_matches(json.loads(config.read_text())["vision_config"], profile.vision):
        _notice(f"the stage-02 checkpoint at {paths.projection} was built for other settings: rerunning stage 02.")
    else:
        return paths.projection
    projection_stage(profile, paths)
    return paths.projection


# --------------------------------------------------------------------------------------------- stage 03
def instruct_stage(profile, paths: Paths, resume=None, save_steps: int | None = None) -> StageResult:
    from transformers import AutoProcessor

    from .inference import evaluate_conversations
    from .instruct import add_lora, export_merged, load_4bit_llava, quantized_module_names, train_instruct
    from .modeling import count_parameters
    from .projection import feature_table, make_dataset
    from .training import loss_history, set_cpu_threads

    set_cpu_threads()
    start = time.perf_counter()
    checkpoint = ensure_projection(profile, paths)
    processor = AutoProcessor.from_pretrained(str(checkpoint))
    tok = processor.tokenizer
    train, train_report = instruct_records(profile, paths, "train")
    val, _ = instruct_records(profile, paths, "val")
    val = val[: profile.n_eval_samples]
    model = load_4bit_llava(checkpoint)
    n_quantized = len(quantized_module_names(model))
    tower = model.model.vision_tower
    feats, index = feature_table(tower, processor.image_processor, train, profile.vision_feature_layer,
                                 paths.features / "train")
    dataset = make_dataset(train, tok, profile, feats, index, profile.instruct)
    model = add_lora(model, profile)
    total, trainable = count_parameters(model)
    print(f"{n_quantized} linear layers in 4-bit nf4; {trainable:,} of {total:,} parameters trainable "
          "(LoRA adapters + full-precision projector)")
    trainer = train_instruct(model, dataset, tok, profile, paths, resume=resume, save_steps=save_steps)
    if not trainer.is_world_process_zero():
        return StageResult({"steps": trainer.state.global_step}, {"train loss": loss_history(trainer)})
    train_seconds = time.perf_counter() - start
    model.save_pretrained(paths.instruct / "adapter")  # LoRA adapters + projector (safetensors)
    result = evaluate_conversations(model, processor, val, max_new_tokens=profile.max_new_tokens)
    merged = export_merged(model, checkpoint, paths.assistant, processor)
    metrics = {"heldout_accuracy": result["accuracy"], "heldout_accuracy_by_type": result["accuracy_by_type"],
               "heldout_questions_by_type": result["count_by_type"], "eos_rate": result["eos_rate"],
               "n_heldout_questions": result["n_questions"], "steps": trainer.state.global_step,
               "n_train_conversations": len(dataset), "skipped_records": dict(train_report.skipped),
               "quantized_linear_layers": n_quantized, "trainable_parameters": trainable,
               "train_seconds": train_seconds, "seconds": time.perf_counter() - start}
    reporting.write_metrics(paths.metrics, "03_qlora_instruct", metrics)
    (paths.metrics / "03_heldout_answers.json").write_text(json.dumps(result["rows"], indent=1, default=str))
    return StageResult(metrics, {"train loss": loss_history(trainer)}, result["rows"],
                       {"model": model, "merged": merged, "processor": processor, "val": val})


def ensure_assistant(profile, paths: Paths):
    if not (paths.assistant / "config.json").exists():
        _notice(f"no stage-03 assistant at {paths.assistant}: running stage 03 now.")
        instruct_stage(profile, paths)
    return paths.assistant
