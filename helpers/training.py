"""Shared training machinery: transformers' Trainer, configured once for every stage.

Trainer gives us, for free and battle-tested: learning-rate schedules with warmup (cosine or warmup-stable-decay),
gradient accumulation, bf16 on GPUs that support it (fp32 on CPU; never fp16, which overflows in Phi attention),
progress bars in notebooks, logging, safetensors checkpoints, resume with optimizer/scheduler/RNG/data position,
and DDP/FSDP via accelerate.

Checkpoints are made crash-safe by ``helpers.checkpointing``: written atomically, validated before resuming, and
resumed automatically by :func:`train` (every stage's entry point into Trainer).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .checkpointing import AtomicCheckpointMixin, clear_checkpoints, resolve_resume

CHECKPOINTS_PER_RUN = 4  # default: a checkpoint every 25 % of the steps (and at the end)


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def default_save_steps(max_steps: int) -> int:
    return max(1, math.ceil(max_steps / CHECKPOINTS_PER_RUN))


def training_arguments(spec, out_dir: str | Path, seed: int, n_examples: int | None = None,
                       save_steps: int | None = None, save_total_limit: int = 2, **overrides) -> TrainingArguments:
    """TrainingArguments for one stage from its StageSpec.

    save_steps: checkpoint every this many optimizer steps (and at the end); None = every 25 % of the run;
    0 = no checkpoints. The newest `save_total_limit` checkpoints are kept."""
    max_steps = spec.max_steps
    if max_steps is None or max_steps <= 0:
        if n_examples is None:
            raise ValueError("give either spec.max_steps or the number of training examples")
        steps_per_epoch = math.ceil(n_examples / (spec.batch_size * spec.grad_accum))
        max_steps = max(1, math.ceil(steps_per_epoch * spec.epochs))
    if save_steps is None:
        save_steps = default_save_steps(max_steps)
    kwargs = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum,
        learning_rate=spec.learning_rate,
        weight_decay=spec.weight_decay,
        max_steps=max_steps,
        lr_scheduler_type=spec.lr_scheduler_type,
        warmup_steps=max(1, round(spec.warmup_ratio * max_steps)),
        adam_beta2=spec.adam_beta2,
        logging_steps=spec.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=save_total_limit,
        report_to="none",
        seed=seed,
        data_seed=seed,
        bf16=bf16_supported(),
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )
    if spec.lr_scheduler_type == "warmup_stable_decay":  # constant after the warmup, then the final decay
        kwargs["lr_scheduler_kwargs"] = {"num_decay_steps": max(1, round(spec.decay_ratio * max_steps)),
                                         "decay_type": "cosine"}
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


THREADS_ENV = "MMPHI_CPU_THREADS"


def cpu_threads() -> int:
    """Threads for intra-op parallelism on a CPU: ``$MMPHI_CPU_THREADS`` when set (e.g. 1 for each of several runs
    sharing a machine, as ``benchmarks/seeds.py`` does), else every core the machine grants (2 in CI)."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        threads = int(value)
        if threads < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive number of threads, not {value!r}")
        return threads
    return max(1, len(os.sched_getaffinity(0)))


def set_cpu_threads() -> None:
    """Use `cpu_threads()` threads for intra-op parallelism (CPU only)."""
    if not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads())


def _llava_of(model):
    """The LlavaForConditionalGeneration inside a (peft-wrapped, accelerate-wrapped) model."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def project_cached_features(model, vision_features: torch.Tensor) -> dict:
    """Run the (trainable) projector on cached vision features and package them as LLaVA's encoder output.

    ``LlavaModel.forward`` accepts ``mm_encoder_outputs`` and then skips the vision tower, so the stock forward
    (placeholder scatter, language model, shifted loss) is used unchanged.
    """
    llava = _llava_of(model)
    projector = llava.model.multi_modal_projector
    dtype = next(projector.parameters()).dtype
    projected = projector(vision_features.to(dtype))
    return {"image": BaseModelOutputWithPooling(pooler_output=list(projected))}


class CourseTrainer(AtomicCheckpointMixin, Trainer):
    """transformers' Trainer with atomic checkpoints (see helpers.checkpointing) and strict resuming: Trainer
    reloads checkpoint weights with ``strict=False`` and only logs mismatched names; here they are an error."""

    def _allowed_missing(self) -> set[str]:
        return set(self.model._keys_to_ignore_on_save or []) if hasattr(self.model, "_keys_to_ignore_on_save") \
            else set()

    def _issue_warnings_after_load(self, load_result):
        missing = [k for k in load_result.missing_keys if k not in self._allowed_missing()]
        if missing or load_result.unexpected_keys:
            raise ValueError(f"the checkpoint does not match the model: missing {missing[:5]}, "
                             f"unexpected {load_result.unexpected_keys[:5]}")
        return super()._issue_warnings_after_load(load_result)


def train(trainer: Trainer, resume=None):
    """``trainer.train()``, resumed from the stage's latest valid checkpoint.

    resume: None/True = automatically when a valid checkpoint of the same settings exists in
    ``trainer.args.output_dir`` (a damaged newer one is skipped with a message); False = from the start (old
    checkpoints are removed); a path = that checkpoint. Every process of a multi-process run picks the same one.
    """
    args = trainer.args
    trainer.run_settings = {"max_steps": args.max_steps,
                            "per_device_train_batch_size": args.per_device_train_batch_size,
                            "gradient_accumulation_steps": args.gradient_accumulation_steps,
                            "learning_rate": args.learning_rate, "seed": args.seed,
                            "n_examples": len(trainer.train_dataset), "world_size": args.world_size}
    main = trainer.is_world_process_zero()
    checkpoint = resolve_resume(args.output_dir, resume, trainer.run_settings, verbose=main)
    trainer.accelerator.wait_for_everyone()
    if checkpoint is None and main:
        clear_checkpoints(args.output_dir, verbose=main)
    trainer.accelerator.wait_for_everyone()
    return trainer.train(resume_from_checkpoint=checkpoint)


class CachedFeatureTrainer(CourseTrainer):
    """Trainer for LLaVA stages whose batches carry precomputed vision features instead of pixels.

    `projector_learning_rate`, when given, puts the projector in its own optimizer group (stage 03: LoRA at
    2e-4, projector at 2e-5 in the full recipe). Checkpoints of a model that is not a peft model (stage 02) hold
    only the trainable weights (the projector), not the frozen LLM and vision tower they were assembled from.
    """

    def __init__(self, *args, projector_learning_rate: float | None = None, **kwargs):
        self.projector_learning_rate = projector_learning_rate
        super().__init__(*args, **kwargs)

    def _trainable_only(self) -> bool:
        return not hasattr(self.model, "get_base_model") and not self.is_fsdp_enabled \
            and not self.is_deepspeed_enabled

    def _save(self, output_dir=None, state_dict=None):
        if state_dict is not None or not self._trainable_only():
            return super()._save(output_dir, state_dict=state_dict)
        # the trainable weights under the model's own state_dict names (save_pretrained would rename LLaVA's keys
        # for the Hub layout, and Trainer's resume loads state_dict names)
        import safetensors.torch

        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        weights = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items() if k in trainable}
        safetensors.torch.save_file(weights, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})

    def _allowed_missing(self) -> set[str]:
        if not self._trainable_only():
            return super()._allowed_missing()
        return {n for n, p in self.model.named_parameters() if not p.requires_grad} | \
            {n for n, _ in self.model.named_buffers()}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        features = inputs.pop("vision_features", None)
        if features is not None:
            inputs["mm_encoder_outputs"] = project_cached_features(model, features)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def create_optimizer(self, *args, **kwargs):
        if self.projector_learning_rate is None or self.optimizer is not None:
            return super().create_optimizer(*args, **kwargs)
        projector, rest = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (projector if "multi_modal_projector" in name else rest).append(p)
        groups = [{"params": rest, "lr": self.args.learning_rate},
                  {"params": projector, "lr": self.projector_learning_rate}]
        self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate, weight_decay=self.args.weight_decay)
        return self.optimizer


def loss_history(trainer: Trainer) -> dict[str, list[float]]:
    steps, losses = [], []
    for row in trainer.state.log_history:
        if "loss" in row and "step" in row:
            steps.append(row["step"])
            losses.append(row["loss"])
    return {"step": steps, "loss": losses}
