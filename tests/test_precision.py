"""The precision policy (helpers.models.precision): fp16 where a GPU has no native bf16 (a T4), with Phi's attention
scores in fp32, so nothing overflows; and training that stops instead of running on when every step is non-finite.

The overflow is reproduced on a CPU with a small Phi whose query and key projections are scaled up until q and k
reach a few hundred, as Phi-2's do: q.k then exceeds fp16's 65,504 wherever the scores are materialised in fp16.
"""
from __future__ import annotations

import math

import pytest
import torch
from transformers import PhiConfig, PhiForCausalLM

from helpers.config import StageSpec
from helpers.models import precision
from helpers.train import training

# the course's fp16 logits against fp32 ones: mean |difference| as a fraction of the mean |logit| (measured on this
# model: 1.3 % under fp16 autocast, 0.08 % with fp16 weights). Not the largest difference: with q.k of several
# hundred thousand the softmax is one-hot, and rounding q to fp16 moves the attended position at a few positions.
FP16_TOLERANCE = 0.05


def test_the_policy_for_each_machine(monkeypatch):
    """Catches: a T4 (bf16 only emulated) sent to bf16 or fp32, a CPU sent to mixed precision, an override ignored."""
    monkeypatch.delenv(precision.PRECISION_ENV, raising=False)
    assert precision.choose(cuda=False, bf16=False) == "fp32"
    assert precision.choose(cuda=True, bf16=True) == "bf16"  # A100, L4, H100 ...
    assert precision.choose(cuda=True, bf16=False) == "fp16"  # T4, V100
    assert precision.choose(cuda=True, bf16=True, override="fp16") == "fp16"  # rehearse a T4's path on an H200
    with pytest.raises(ValueError, match="needs a GPU"):
        precision.choose(cuda=False, bf16=False, override="bf16")
    with pytest.raises(ValueError, match="choose auto"):
        precision.choose(cuda=True, bf16=True, override="fp8")

    def t4_bf16(including_emulation: bool = True):  # what torch reports on a T4 (compute capability 7.5)
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", t4_bf16)
    t4 = precision.current()
    assert (t4.name, t4.device, t4.dtype) == ("fp16", "cuda:0", torch.float16)
    assert t4.attention == precision.FP32_ATTENTION and t4.trainer_args == {"bf16": False, "fp16": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    a100 = precision.current()
    assert (a100.name, a100.dtype, a100.attention) == ("bf16", torch.bfloat16, "sdpa")
    assert a100.trainer_args == {"bf16": True, "fp16": False}


def _phi_with_large_queries_and_keys(attention: str) -> PhiForCausalLM:
    config = PhiConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=64)
    torch.manual_seed(0)
    model = PhiForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:  # q and k up to ~340, as in Phi-2: q.k over 16 dims overflows fp16
            layer.self_attn.q_proj.weight.mul_(500)
            layer.self_attn.k_proj.weight.mul_(500)
    model.set_attn_implementation(attention)
    return model.eval()


def _ids():
    return torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_fp16_overflows_in_stock_attention_and_not_in_the_courses():
    """Stock attention that materialises the scores in fp16 (Phi's eager attention; SDPA's math kernel on a GPU)
    gives non-finite logits, in an fp16 model (the assistant on a T4) and under fp16 autocast (training on a T4);
    the course's attention gives finite logits within FP16_TOLERANCE of fp32.
    Catches: the fp32 attention not registered or not applied, autocast left on inside it (SDPA is on autocast's
    fp16 list, so the scores would be fp16 again), or the mask left in fp16."""
    ids = _ids()
    reference = _phi_with_large_queries_and_keys("eager")(ids).logits
    assert torch.isfinite(reference).all()
    scale = float(reference.abs().mean())

    stock = _phi_with_large_queries_and_keys("eager")
    assert not torch.isfinite(stock.half()(ids).logits).all()  # the overflow this guards against
    with torch.autocast("cpu", dtype=torch.float16):
        assert not torch.isfinite(_phi_with_large_queries_and_keys("eager")(ids).logits).all()

    course = _phi_with_large_queries_and_keys(precision.FP32_ATTENTION)
    with torch.autocast("cpu", dtype=torch.float16):
        autocast_logits = course(ids).logits.float()
    half_logits = course.half()(ids).logits.float()
    for logits in (autocast_logits, half_logits):
        assert torch.isfinite(logits).all()
        assert float((logits - reference).abs().mean()) <= FP16_TOLERANCE * scale


def test_the_scores_are_fp32_whatever_dtype_reaches_the_attention(monkeypatch):
    """Under fp16 autocast the attention may receive fp16 q/k/v (after an ordinary Linear) or fp32 ones (a 4-bit
    layer returns its input's dtype): either way SDPA must run on fp32 operands with autocast off, since SDPA is on
    autocast's fp16 list. Catches an early return for fp32 inputs that lets autocast cast them back to fp16."""
    seen = []
    original = precision.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((query.dtype, key.dtype, torch.is_autocast_enabled("cpu")))
        return original(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(precision, "sdpa_attention_forward", spy)
    module = torch.nn.Module()
    module.is_causal, module.training = True, False
    for dtype in (torch.float16, torch.float32):
        q, k, v = (torch.randn(1, 2, 8, 16).to(dtype) for _ in range(3))
        with torch.autocast("cpu", dtype=torch.float16):
            out, _ = precision.fp32_score_attention(module, q, k, v, None, scaling=0.25)
        assert out.dtype == dtype
    assert seen == [(torch.float32, torch.float32, False)] * 2, seen


def test_a_few_fp16_steps_with_a_gradient_scaler_lower_the_loss():
    """Training as a T4 does (fp32 weights, fp16 autocast, a gradient scaler), on the CPU: with the course's attention
    every step is taken and the loss falls; with stock attention the loss is NaN and the scaler skips every step.
    Catches: fp16 training that silently makes no progress (every step skipped by the scaler)."""
    def train(attention: str) -> tuple[list[float], int]:
        model = _phi_with_large_queries_and_keys(attention).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        ids, losses, skipped = _ids(), [], 0
        for _ in range(8):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(ids, labels=ids).loss
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            skipped += scaler.get_scale() < scale  # the scaler lowers its scale when it skips a step
            losses.append(float(loss))
        return losses, skipped

    losses, skipped = train(precision.FP32_ATTENTION)
    assert all(math.isfinite(x) for x in losses) and skipped == 0, (losses, skipped)
    assert losses[-1] < losses[0] - 0.5, losses
    stock_losses, stock_skipped = train("eager")
    assert stock_skipped == 8 and not any(math.isfinite(x) for x in stock_losses)


class _Optimizer:
    step_was_skipped = True  # what accelerate's optimizer reports after the gradient scaler skipped a step


def test_consecutive_skipped_steps_stop_training_with_a_clear_message():
    """Catches: training that runs on (and "finishes") while the scaler skips every step, or a counter that does not
    reset after a good step. The callback is what every course trainer carries (CourseTrainer adds it)."""
    from transformers.trainer_callback import TrainerControl, TrainerState

    callback, state = training.StopOnNonFiniteSteps(limit=3), TrainerState()
    good = type("Good", (), {"step_was_skipped": False})()
    for step, optimizer in enumerate([_Optimizer(), _Optimizer(), good, _Optimizer(), _Optimizer()], 1):
        state.global_step = step
        callback.on_step_end(None, state, TrainerControl(), optimizer=optimizer)
    with pytest.raises(training.NonFiniteTraining, match="3 consecutive optimizer steps had non-finite gradients"):
        callback.on_step_end(None, state, TrainerControl(), optimizer=_Optimizer())


def test_a_trainer_whose_gradients_are_never_finite_stops(tok, tmp_path):
    """A real CourseTrainer run: a model whose loss is NaN logs a NaN gradient norm at every step (fp32 on the CPU)
    or has every step skipped by the gradient scaler (fp16 on a GPU), and stops after MAX_SKIPPED_STEPS instead of
    running its 40 steps."""
    from helpers.config import TINY
    from helpers.models.modeling import new_phi_lm
    from helpers.train.pretrain import PackedBlocks, pack_documents

    model = new_phi_lm(TINY.pretrain_phi, tok, seed=0)
    with torch.no_grad():
        model.model.final_layernorm.weight.fill_(float("nan"))
    blocks, mask = pack_documents(tok, ["a red circle at top left."] * 64, 32)
    args = training.training_arguments(StageSpec(learning_rate=1e-3, batch_size=8, max_steps=40, logging_steps=1),
                                       tmp_path, seed=0, save_steps=0, disable_tqdm=True)
    trainer = training.CourseTrainer(model=model, args=args, train_dataset=PackedBlocks(blocks, mask))
    # fp32 here (no scaler: the logged norms count); on a GPU in fp16 the scaler's skipped steps count first
    with pytest.raises(training.NonFiniteTraining, match=f"{training.MAX_SKIPPED_STEPS} consecutive (logged gradient "
                                                         "norms were not finite|optimizer steps had non-finite)"):
        trainer.train()
    assert trainer.state.global_step == training.MAX_SKIPPED_STEPS
