"""Shared training machinery: transformers' Trainer, configured once for every stage.

Trainer gives us, for free and battle-tested: learning-rate schedules with warmup (cosine or warmup-stable-decay),
gradient accumulation, mixed precision as ``helpers.models.precision`` decides (bf16 where native, fp16 with a gradient
scaler on a T4, fp32 on a CPU),
progress bars in notebooks, logging, safetensors checkpoints, resume with optimizer/scheduler/RNG/data position,
and DDP/FSDP via accelerate.

Checkpoints are made crash-safe by ``helpers.train.checkpointing``: written atomically, validated before resuming, and
resumed automatically by :func:`train` (every stage's entry point into Trainer).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.modeling_outputs import BaseModelOutputWithPooling

from helpers.models import precision
from helpers.train.checkpointing import AtomicCheckpointMixin, clear_checkpoints, resolve_resume

CHECKPOINTS_PER_RUN = 4  # default: a checkpoint every 25 % of the steps (and at the end)


def free_accelerator_memory() -> None:
    """Return memory that is no longer referenced to the GPU (after training, before evaluation or export)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def default_save_steps(max_steps: int) -> int:
    return max(1, math.ceil(max_steps / CHECKPOINTS_PER_RUN))


def training_arguments(spec, out_dir: str | Path, seed: int, n_examples: int | None = None,
                       save_steps: int | None = None, save_total_limit: int = 2, length_balanced: bool = False,
                       **overrides) -> TrainingArguments:
    """TrainingArguments for one stage from its StageSpec.

    save_steps: checkpoint every this many optimizer steps (and at the end); None = every 25 % of the run;
    0 = no checkpoints. The newest `save_total_limit` checkpoints are kept.

    length_balanced: when an optimizer step is made of several micro-batches (gradient accumulation, or several
    processes), let transformers' ``BatchRebalanceSampler`` (``train_sampling_strategy="batch_rebalance"``) cut each
    randomly drawn optimizer batch into micro-batches of similar padded cost: long conversations share a
    micro-batch with long ones, short with short, so little of a micro-batch is padding. Every optimizer step still
    sees a random set of ``batch_size x grad_accum`` examples, and the loss is normalised by the answer tokens of the
    whole optimizer batch (Trainer's ``num_items_in_batch``), so the step's loss and gradient do not depend on how it
    is cut. With one micro-batch per optimizer step there is nothing to balance and the random sampler is kept."""
    max_steps = spec.max_steps
    if max_steps is None or max_steps <= 0:
        if n_examples is None:
            raise ValueError("give either spec.max_steps or the number of training examples")
        steps_per_epoch = math.ceil(n_examples / (spec.batch_size * spec.grad_accum))
        max_steps = max(1, math.ceil(steps_per_epoch * spec.epochs))
    if save_steps is None:
        save_steps = spec.save_steps if getattr(spec, "save_steps", None) is not None else default_save_steps(max_steps)
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
        **precision.current().trainer_args,  # bf16 / fp16 (with a gradient scaler) / fp32: helpers.models.precision
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )
    if length_balanced and spec.grad_accum * _world_size() > 1:
        kwargs.update(balanced_sampling_arguments())
    if spec.lr_scheduler_type == "warmup_stable_decay":  # constant after the warmup, then the final decay
        kwargs["lr_scheduler_kwargs"] = {"num_decay_steps": max(1, round(spec.decay_ratio * max_steps)),
                                         "decay_type": "cosine"}
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def balanced_sampling_arguments() -> dict:
    """TrainingArguments fields for length-balanced micro-batches, in whichever form this transformers has."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in fields:  # transformers >= 5.x: BatchRebalanceSampler
        return {"train_sampling_strategy": "batch_rebalance"}
    if "group_by_length" in fields:  # older releases: LengthGroupedSampler
        return {"group_by_length": True}
    return {}


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


def _require_mm_encoder_outputs(llava_model) -> None:
    """transformers < 5.18 has no ``mm_encoder_outputs`` in LlavaModel.forward and would silently ignore it (the
    image placeholders would keep the <image> token's embedding and the projector would never train)."""
    import inspect

    cls = type(llava_model)
    if cls not in _MM_CHECKED:
        _MM_CHECKED[cls] = "mm_encoder_outputs" in inspect.signature(cls.forward).parameters
    if not _MM_CHECKED[cls]:
        import transformers

        raise RuntimeError(f"transformers {transformers.__version__} cannot take cached vision features "
                           "(LlavaModel.forward has no mm_encoder_outputs): install transformers>=5.18")


@torch.no_grad()
def mean_target_loss(model, batches, prepare=None) -> float:
    """Mean next-token cross-entropy over every target token of `batches` (dicts of tensors with ``labels``, -100 =
    ignored), each batch weighted by its number of targets, so the figure does not depend on how rows were batched.
    ``prepare(model, batch)`` may pop inputs from the batch and return extra keyword arguments for the forward (the
    projected cached vision features)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        extra = prepare(model, batch) if prepare else {}
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch, **extra).loss) * n
        count += n
    return total / count


_MM_CHECKED: dict = {}


def project_cached_features(model, vision_features: torch.Tensor) -> dict:
    """Run the (trainable) projector on cached vision features and package them as LLaVA's encoder output.

    ``LlavaModel.forward`` accepts ``mm_encoder_outputs`` and then skips the vision tower, so the stock forward
    (placeholder scatter, language model, shifted loss) is used unchanged.
    """
    llava = _llava_of(model)
    _require_mm_encoder_outputs(llava.model)
    projector = llava.model.multi_modal_projector
    dtype = next(projector.parameters()).dtype
    projected = projector(vision_features.to(dtype))
    return {"image": BaseModelOutputWithPooling(pooler_output=list(projected))}


# ----------------------------------------------------------------------------------- the loss at answer positions
LOSS_ELEMENTS_PER_CHUNK = 2 ** 25  # logits computed at once: 32M (655 positions of Phi-2's 51,200-token vocab)


def loss_chunk_tokens(vocab_size: int) -> int:
    """Target positions whose logits exist at the same time in :func:`answer_only_loss`."""
    return max(64, LOSS_ELEMENTS_PER_CHUNK // max(1, vocab_size))


def _chunk_loss_sum(lm_head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden)
    # the same arithmetic as transformers' ForCausalLMLoss: logits upcast to fp32, cross-entropy summed
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


def chunked_cross_entropy_sum(lm_head, hidden: torch.Tensor, targets: torch.Tensor,
                              chunk_tokens: int | None = None, recompute: bool = True) -> torch.Tensor:
    """Sum of the cross-entropy of ``lm_head(hidden)`` against `targets` (hidden: N x d, targets: N), computed
    `chunk_tokens` rows at a time under ``torch.utils.checkpoint``: only one chunk's logits (and their fp32 copy)
    exist at any time, in the forward and in the backward pass (which recomputes them), instead of N x vocab fp32
    logits plus their gradient. Costs one more LM-head matmul per target position (about 1.5 % of a Phi-2 step).
    ``recompute=False`` keeps every chunk's tensors instead (the time planner counts kernels that way)."""
    from torch.utils.checkpoint import checkpoint

    chunk_tokens = chunk_tokens or loss_chunk_tokens(lm_head.out_features)
    n = hidden.shape[0]
    if n == 0:  # no answer token in this micro-batch: a zero that still connects to the graph
        return hidden.sum() * 0.0
    total = None
    for start in range(0, n, chunk_tokens):
        h, y = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if recompute and torch.is_grad_enabled() and h.requires_grad:
            part = checkpoint(_chunk_loss_sum, lm_head, h, y, use_reentrant=False)
        else:
            part = _chunk_loss_sum(lm_head, h, y)
        total = part if total is None else total + part
    return total


def answer_targets(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """(hidden states, next-token targets) at the positions whose next token is a target (the answers and their
    EOS): the label shift of a causal LM (position t predicts label t+1), then only the kept rows."""
    shifted = labels[:, 1:]
    keep = shifted != ignore_index
    return hidden[:, :-1][keep], shifted[keep]


def answer_only_loss(model, inputs: dict, num_items_in_batch=None, chunk_tokens: int | None = None,
                     loss_sum=None):
    """The model's causal-LM loss, computed only where it is defined and without the full logits.

    The LLaVA forward runs as usual (inside the wrapped model, so DDP and mixed precision see it) but is asked for
    the logits of the last position only (``logits_to_keep=1``); the language model's final hidden states are taken
    from a forward hook; the LM head and the cross-entropy then run on the answer positions alone, a chunk at a time
    (:func:`chunked_cross_entropy_sum`). The result equals transformers' ForCausalLMLoss (sum over answer tokens
    divided by `num_items_in_batch`, or by this batch's answer tokens when it is None), so Trainer's gradient
    accumulation treats it exactly as before. Returns (loss, number of answer tokens in this batch).

    `loss_sum(lm_head, hidden, targets)`: another way to sum the cross-entropy of the answer positions (for example a
    fused linear cross-entropy kernel, ``benchmarks/qlora_step.py --ways fused``), called only when there is at least
    one answer position; default the chunked one."""
    llava = _llava_of(model)
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    captured = {}

    def keep_hidden(module, args, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        captured["hidden"] = hidden
        kind = hidden.device.type
        # the mixed precision the forward ran under (accelerate applies autocast inside model.forward only)
        captured["autocast"] = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))

    handle = llava.model.language_model.register_forward_hook(keep_hidden)
    try:
        model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    hidden, targets = answer_targets(captured["hidden"], labels.to(captured["hidden"].device))
    kind, enabled, dtype = captured["autocast"]
    with torch.autocast(kind, dtype=dtype, enabled=enabled):  # the LM head as the model's own loss would run it
        if loss_sum is None:
            total = chunked_cross_entropy_sum(llava.lm_head, hidden, targets, chunk_tokens)
        elif targets.numel() == 0:  # as chunked_cross_entropy_sum: a zero that still connects to the graph
            total = hidden.sum() * 0.0
        else:
            total = loss_sum(llava.lm_head, hidden, targets)
    n = targets.numel()
    if num_items_in_batch is None:
        return total / max(n, 1), n
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch, n


MAX_SKIPPED_STEPS = 20  # consecutive optimizer steps skipped for non-finite gradients before training stops


class NonFiniteTraining(RuntimeError):
    """Training produced nothing but non-finite gradients or losses for too many consecutive steps."""


class StopOnNonFiniteSteps(TrainerCallback):
    """Stops training with a clear message after `limit` consecutive non-finite steps.

    With fp16 (a T4) the gradient scaler skips a step whose gradients are not finite and halves the loss scale; a
    few skips at the start are normal (the scale searches its range), a long run of them means the model overflows
    and every further step would be skipped too: without this, training would "finish" with the weights it started
    from. In bf16 and fp32 there is no scaler: consecutive logged gradient norms that are not finite count instead."""

    def __init__(self, limit: int = MAX_SKIPPED_STEPS):
        self.limit, self.skipped_steps, self.nonfinite_norms = limit, 0, 0

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        skipped = bool(getattr(optimizer, "step_was_skipped", False))
        self.skipped_steps = self.skipped_steps + 1 if skipped else 0
        self._check(self.skipped_steps, "optimizer steps had non-finite gradients (skipped by the scaler)", state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        norm = (logs or {}).get("grad_norm")
        if norm is None:
            return
        self.nonfinite_norms = 0 if math.isfinite(norm) else self.nonfinite_norms + 1
        self._check(self.nonfinite_norms, "logged gradient norms were not finite", state)

    def _check(self, count: int, what: str, state):
        if count >= self.limit:
            raise NonFiniteTraining(
                f"{count} consecutive {what} (up to step {state.global_step}): the model overflows in this "
                f"precision and is not learning. Check the precision (helpers.models.precision; "
                f"MMPHI_PRECISION=fp32 to compare) and the learning rate; the last good checkpoint is kept.")


class CourseTrainer(AtomicCheckpointMixin, Trainer):
    """transformers' Trainer with atomic checkpoints (see helpers.train.checkpointing) and strict resuming: Trainer
    reloads checkpoint weights with ``strict=False`` and only logs mismatched names; here they are an error.
    Training stops with :class:`NonFiniteTraining` after :data:`MAX_SKIPPED_STEPS` consecutive non-finite steps."""

    def __init__(self, *args, callbacks=None, **kwargs):
        super().__init__(*args, callbacks=[*(callbacks or []), StopOnNonFiniteSteps()], **kwargs)

    def _allowed_missing(self) -> set[str]:
        return set(self.model._keys_to_ignore_on_save or []) if hasattr(self.model, "_keys_to_ignore_on_save") \
            else set()

    def _issue_warnings_after_load(self, load_result):
        missing = [k for k in load_result.missing_keys if k not in self._allowed_missing()]
        if missing or load_result.unexpected_keys:
            raise ValueError(f"the checkpoint does not match the model: missing {missing[:5]}, "
                             f"unexpected {load_result.unexpected_keys[:5]}")
        return super()._issue_warnings_after_load(load_result)

    def floating_point_ops(self, inputs) -> int:
        """Trainer's estimate, 6 x input tokens x non-embedding parameters, with the parameter count taken once:
        Trainer recounts it at every step by walking every module (a visible share of a tiny model's step on 2 CPU
        cores), and the count does not change while training."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        cached = getattr(self, "_parameter_count", None)
        if cached is None or cached[0] is not self.model:
            cached = self._parameter_count = (self.model, self.model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[main_input].numel() * cached[1]


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
    if checkpoint is not None:
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        if state.global_step >= args.max_steps:  # the run is complete: load it (Trainer would train one more step)
            if main:
                print(f"{checkpoint} holds the finished run: loaded, nothing left to train", flush=True)
            trainer._load_from_checkpoint(checkpoint)
            trainer.state = state
            return TrainOutput(state.global_step, state.log_history[-1].get("train_loss", 0.0) if state.log_history
                               else 0.0, {})
    return trainer.train(resume_from_checkpoint=checkpoint)


class CachedFeatureTrainer(CourseTrainer):
    """Trainer for LLaVA stages whose batches carry precomputed vision features instead of pixels.

    `projector_learning_rate`, when given, puts the projector in its own optimizer group (stage 03: LoRA at
    2e-4, projector at 2e-5 in the full recipe). Checkpoints of a model that is not a peft model (stage 02) hold
    only the trainable weights (the projector), not the frozen LLM and vision tower they were assembled from.
    """

    def __init__(self, *args, projector_learning_rate: float | None = None, answer_only_loss: bool = True,
                 **kwargs):
        self.projector_learning_rate = projector_learning_rate
        self.answer_only_loss = answer_only_loss
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler).__name__ == "BatchRebalanceSampler":  # its own default seed is a constant (42)
            sampler.seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return sampler

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
        if not self.answer_only_loss or return_outputs or "labels" not in inputs or self.label_smoother is not None \
                or self.compute_loss_func is not None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # Trainer counts the answer tokens of the whole optimizer batch (num_items_in_batch) only for models that
        # take loss kwargs; otherwise each micro-batch is a mean and Trainer divides by the accumulation steps
        loss, _ = answer_only_loss(model, inputs, num_items_in_batch if self.model_accepts_loss_kwargs else None)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs \
                and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does for the model's own loss
        return loss

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


def reset_peak_memory() -> None:
    """Start measuring a stage's peak GPU memory (see :func:`run_figures`)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def run_figures(trainer: Trainer) -> dict:
    """Measured figures of a finished run: seconds per optimizer step and, on a GPU, the peak memory allocated
    since :func:`reset_peak_memory` (what the memory planner estimates)."""
    summary = next((row for row in reversed(trainer.state.log_history) if "train_runtime" in row), {})
    steps = trainer.state.global_step - getattr(trainer, "resumed_from_step", 0)
    out = {"train_runtime_seconds": summary.get("train_runtime")}
    if summary.get("train_runtime") and steps:
        out["seconds_per_step"] = summary["train_runtime"] / steps
    if torch.cuda.is_available():
        out["gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        out["gpu"] = torch.cuda.get_device_name()
    return out


def loss_history(trainer: Trainer, key: str = "loss") -> dict[str, list[float]]:
    """The logged `key` ("loss": training, "eval_loss": validation) against the optimizer step."""
    steps, losses = [], []
    for row in trainer.state.log_history:
        if key in row and "step" in row:
            steps.append(row["step"])
            losses.append(row[key])
    return {"step": steps, "loss": losses}
