"""Shared training machinery: transformers' Trainer, configured once for every stage.

Trainer gives us, for free and battle-tested: cosine schedule with warmup, gradient accumulation, bf16 on GPUs
that support it (fp32 on CPU; never fp16, which overflows in Phi attention), progress bars in notebooks, logging,
safetensors checkpoints, resume with optimizer/scheduler/RNG/data position, and DDP/FSDP via accelerate.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.modeling_outputs import BaseModelOutputWithPooling


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def training_arguments(spec, out_dir: str | Path, seed: int, n_examples: int | None = None,
                       save_steps: int | None = None, **overrides) -> TrainingArguments:
    """TrainingArguments for one stage from its StageSpec."""
    max_steps = spec.max_steps
    if max_steps is None or max_steps <= 0:
        if n_examples is None:
            raise ValueError("give either spec.max_steps or the number of training examples")
        steps_per_epoch = math.ceil(n_examples / (spec.batch_size * spec.grad_accum))
        max_steps = max(1, math.ceil(steps_per_epoch * spec.epochs))
    kwargs = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum,
        learning_rate=spec.learning_rate,
        weight_decay=spec.weight_decay,
        max_steps=max_steps,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, round(spec.warmup_ratio * max_steps)),
        logging_steps=spec.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=2,
        report_to="none",
        seed=seed,
        data_seed=seed,
        bf16=bf16_supported(),
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def set_cpu_threads() -> None:
    """Use every core the machine grants (2 in CI) for intra-op parallelism."""
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))


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


class CachedFeatureTrainer(Trainer):
    """Trainer for LLaVA stages whose batches carry precomputed vision features instead of pixels.

    `projector_learning_rate`, when given, puts the projector in its own optimizer group (stage 03: LoRA at
    2e-4, projector at 2e-5 in the full recipe).
    """

    def __init__(self, *args, projector_learning_rate: float | None = None, **kwargs):
        self.projector_learning_rate = projector_learning_rate
        super().__init__(*args, **kwargs)

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
