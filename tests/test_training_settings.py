"""Stage settings reach Trainer: the learning-rate schedule, AdamW's beta2, and the CPU thread count."""
import dataclasses

import pytest

from helpers.config import FULL, TINY, StageSpec
from helpers.train.training import THREADS_ENV, cpu_threads, training_arguments


def _name(args) -> str:
    return getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)


def test_warmup_stable_decay_schedule_and_beta2(tmp_path):
    spec = StageSpec(learning_rate=1e-3, batch_size=4, max_steps=100, lr_scheduler_type="warmup_stable_decay",
                     decay_ratio=0.4, adam_beta2=0.95)
    args = training_arguments(spec, tmp_path, seed=0)
    assert _name(args) == "warmup_stable_decay"
    assert args.lr_scheduler_kwargs["num_decay_steps"] == 40 and args.adam_beta2 == 0.95

    import torch
    from transformers import get_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=args.warmup_steps,
                          num_training_steps=args.max_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[10] == lrs[59] == pytest.approx(1e-3)  # constant after the warmup, until the decay
    assert lrs[80] < 1e-3 and lrs[99] < lrs[80]  # then decays over the last 40 steps


def test_default_stage_settings_are_cosine_and_transformers_betas(tmp_path):
    for spec in (FULL.pretrain, FULL.instruct, TINY.instruct, TINY.projection):
        args = training_arguments(spec, tmp_path, seed=0, n_examples=100)
        assert _name(args) == "cosine" and args.adam_beta2 == 0.999
    tiny = training_arguments(TINY.pretrain, tmp_path, seed=0)
    assert _name(tiny) == "warmup_stable_decay" and tiny.adam_beta2 == 0.95


def test_cpu_threads_from_the_environment(monkeypatch):
    import os

    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert cpu_threads() == len(os.sched_getaffinity(0))  # default: every core
    monkeypatch.setenv(THREADS_ENV, "1")
    assert cpu_threads() == 1
    monkeypatch.setenv(THREADS_ENV, "0")
    with pytest.raises(ValueError):
        cpu_threads()


def test_tiny_training_data_weights_leave_the_heldout_split_alone():
    assert dict(TINY.world.train_type_weights)["yes/no"] > 1
    assert dataclasses.replace(TINY.world, train_type_weights=None).train_type_weights is None
