"""The memory planner: exact counts against real models, measured activations against a real forward, sane
behaviour (more batch -> more memory, checkpointing and 4-bit -> less), and the H200 peaks of the committed benchmark
results: in sample (a regression guard: the allowances were fitted to them) and held out (the allowance refitted
without the configuration that is checked)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from helpers.config import FULL, TINY
from helpers.planning.memory_plan import (
    GiB,
    StandInTokenizer,
    component_parameters,
    format_plan,
    measure_activations,
    nf4_bytes,
    plan_memory,
    stage_model,
)

GPU = "A100-40GB"


@pytest.fixture(scope="module")
def tok():
    return StandInTokenizer.for_profile(TINY)


@pytest.fixture(scope="module")
def real_tiny(tok):
    """A real, randomly initialised tiny LLaVA assembled as stage 02 does it."""
    from transformers import CLIPVisionModel

    from helpers.models.modeling import assemble_llava, clip_vision_config, new_phi_lm

    lm = new_phi_lm(TINY.phi, tok, seed=1)
    torch.manual_seed(2)
    tower = CLIPVisionModel(clip_vision_config(TINY.vision))
    return assemble_llava(lm, tower, tok, TINY, seed=3)


@pytest.fixture(scope="module")
def full_plans():
    """The default full-profile plans (each builds Phi-2-sized models on meta: about a second)."""
    return {("projection", "T4"): plan_memory(FULL, "projection", gpu="T4"),
            ("instruct", "T4"): plan_memory(FULL, "instruct", gpu="T4"),
            ("instruct", GPU): plan_memory(FULL, "instruct", gpu=GPU)}


@pytest.fixture(scope="module")
def tiny_plans():
    return {"projection": plan_memory(TINY, "projection", gpu=GPU),
            "instruct": plan_memory(TINY, "instruct", gpu=GPU)}


def test_tiny_parameter_counts_equal_the_real_model(real_tiny, tiny_plans):
    real = component_parameters(real_tiny)
    plan = tiny_plans["projection"].parameters
    for part in ("vision_tower", "projector", "language_model", "lm_head", "total"):
        assert plan[part] == real[part], part
    assert plan["total"] == sum(p.numel() for p in real_tiny.parameters())
    # stage 02 trains the projector only
    assert plan["trainable"] == real["projector"] == sum(p.numel() for p in
                                                         real_tiny.model.multi_modal_projector.parameters())


def test_tiny_nf4_bytes_and_lora_equal_bitsandbytes_and_peft(real_tiny, tiny_plans, tmp_path):
    import bitsandbytes as bnb
    from conftest import four_bit_model

    from helpers.course import run_cells

    real_tiny.save_pretrained(tmp_path)
    model = four_bit_model(tmp_path)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 6 * TINY.phi.num_hidden_layers
    tensors = {}
    for m in quantized:
        qs = m.weight.quant_state
        for t in (m.weight.data, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code):
            tensors[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
    plan = tiny_plans["instruct"]
    assert plan.parameters["quantized"] == sum(m.weight.quant_state.shape.numel() for m in quantized)
    assert plan.weight_bytes["language_model_nf4"] == sum(tensors.values())

    peft_model = run_cells("03_qlora_instruct", ["lora"], model=model, profile=TINY)["model"]  # notebook 03's cell
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora > 0 and plan.parameters["lora"] == lora
    assert plan.parameters["trainable"] == trainable
    # what is not 4-bit was upcast to fp32 by prepare_model_for_kbit_training, as the plan assumes
    rest = [(n, p) for n, p in peft_model.named_parameters()
            if "lora_" not in n and "vision_tower" not in n and "multi_modal_projector" not in n
            and not isinstance(p, bnb.nn.Params4bit)]
    assert {p.dtype for _, p in rest} == {torch.float32}
    assert plan.weight_bytes["language_model"] + plan.weight_bytes["lm_head"] == sum(p.numel() * 4 for _, p in rest)


def test_nf4_is_about_4_127_bits_per_weight_at_full_size(full_plans):
    plan = full_plans[("instruct", "T4")]
    bits = 8 * plan.weight_bytes["language_model_nf4"] / plan.parameters["quantized"]
    assert 4.126 < bits < 4.128
    assert plan.parameters["quantized"] == 32 * (4 * 2560 * 2560 + 2 * 2560 * 10240)
    assert plan.parameters["lora"] == 32 * 128 * (4 * (2560 + 2560) + 2 * (2560 + 10240))


def test_meta_activation_count_equals_a_real_forward(real_tiny):
    """The count on the meta model is what autograd really saves on a real model (same ops, fp32, eager)."""
    real_tiny.config.text_config._attn_implementation = "eager"
    real_tiny.model.language_model.config._attn_implementation = "eager"
    real_tiny.requires_grad_(False).model.multi_modal_projector.requires_grad_(True)
    meta, _ = stage_model(TINY, "projection", torch.float32)
    meta.model.language_model.config._attn_implementation = "eager"
    real = measure_activations(real_tiny, 3, 40, None, attention="math")
    on_meta = measure_activations(meta, 3, 40, None, attention="math")
    assert real.without_checkpointing > 0
    assert on_meta.per_layer == real.per_layer
    assert on_meta.outside_layers == real.outside_layers
    assert on_meta.logits == real.logits == 3 * 40 * TINY.phi.vocab_size * 4


@pytest.mark.parametrize("stage", ["projection", "instruct"])
def test_more_batch_or_tokens_needs_more_activation_memory(stage):
    small = plan_memory(TINY, stage, gpu=GPU, batch_size=4, seq_length=64)
    batch = plan_memory(TINY, stage, gpu=GPU, batch_size=8, seq_length=64)
    longer = plan_memory(TINY, stage, gpu=GPU, batch_size=4, seq_length=128)
    for bigger in (batch, longer):
        assert bigger.activation_bytes_without_checkpointing > small.activation_bytes_without_checkpointing
        assert bigger.activation_bytes_with_checkpointing > small.activation_bytes_with_checkpointing
        assert bigger.total_bytes > small.total_bytes
        assert bigger.weights_total == small.weights_total  # weights do not depend on the batch
    # twice the rows: (almost exactly) twice the activations
    assert batch.activation_bytes_without_checkpointing == pytest.approx(
        2 * small.activation_bytes_without_checkpointing, rel=0.05)


def test_checkpointing_reduces_activations_and_the_total(full_plans):
    on = full_plans[("instruct", GPU)]
    off = dataclasses.replace(on, gradient_checkpointing=False)  # a plan measures both; the flag picks one
    assert on.activation_bytes_with_checkpointing < on.activation_bytes_without_checkpointing / 5
    assert on.activation_bytes == on.activation_bytes_with_checkpointing
    assert off.activation_bytes == off.activation_bytes_without_checkpointing
    assert on.total_bytes < off.total_bytes
    assert not off.fits and on.fits  # a 40 GB card needs checkpointing at batch 4 x 1024


def test_4bit_weights_are_smaller_than_bf16(full_plans):
    nf4 = full_plans[("instruct", GPU)]
    bf16 = plan_memory(FULL, "instruct", gpu=GPU, load_in_4bit=False)
    assert nf4.parameters["quantized"] > 0 and bf16.parameters["quantized"] == 0
    llm_nf4 = nf4.weight_bytes["language_model_nf4"]
    assert llm_nf4 < 0.27 * 2 * nf4.parameters["quantized"]  # about a quarter of bf16
    assert nf4.weights_total < bf16.weights_total
    assert nf4.parameters["lora"] == bf16.parameters["lora"]
    assert nf4_bytes(2560 * 10240) < nf4_bytes(2560 * 10240, double_quant=False) < 2560 * 10240 * 0.57


def test_a_t4_is_planned_in_fp16_what_the_course_runs_there(full_plans):
    """A T4 has no native bf16, so the course trains in fp16 there (helpers.models.precision: fp16 autocast, frozen
    weights in fp16, Phi's attention in fp32): both stages' defaults fit, stage 02's worst case (16 rows of 512 tokens)
    included, because the frozen Phi-2 takes 2 bytes per weight. In fp32, as the course trained on a T4 before, that
    worst case did not fit (Phi-2 alone is 11 GB): still so when asked for explicitly.
    Bug caught: a T4 planned in fp32 or bf16 while the course trains in fp16 there (recipes sized for the wrong
    memory), or fp32 no longer selectable."""
    instruct, projection = full_plans[("instruct", "T4")], full_plans[("projection", "T4")]
    for plan in (instruct, projection):
        assert plan.precision == "fp16 autocast" and plan.attention == "efficient" and plan.gradient_checkpointing
        assert plan.master_weight_bytes == 0  # trainable parameters are fp32: the scaler needs no master copy
    assert instruct.fits and instruct.needed_bytes < 14.75 * GiB, format_plan(instruct)
    assert projection.fits, format_plan(projection)
    fp32_projection = plan_memory(FULL, "projection", gpu="T4", precision="fp32")
    assert fp32_projection.precision == "fp32" and not fp32_projection.fits
    assert plan_memory(FULL, "projection", gpu="T4", batch_size=4, seq_length=160, precision="fp32").fits
    # the frozen Phi-2 of stage 02 in fp16 takes half its fp32 bytes
    assert 2 * projection.weight_bytes["language_model"] == fp32_projection.weight_bytes["language_model"]
    plan = instruct
    phi2 = full_plans[("projection", "T4")].parameters
    assert phi2["language_model"] + phi2["lm_head"] + 51200 == 2_779_683_840  # Phi-2 minus its folded head bias
    text = format_plan(plan)
    assert "FITS" in text and "activations" in text and "fp32_score_attention" in text


@pytest.mark.parametrize("gpu", ["T4", "V100-16GB"])
def test_gpus_without_native_bf16_are_planned_in_fp16_and_the_others_stay_selectable(gpu):
    """The "auto" plan of a GPU without native bf16 is fp16, as helpers.models.precision.choose decides for the course;
    bf16 and fp32 can still be asked for, anything else is refused.
    Bug caught: the planner's own rule drifting from helpers.models.precision (the old ``bf16 if native else fp32``, or
    a V100 entry marked as having native bf16), or the explicit precisions no longer honoured."""
    from helpers.models.precision import choose
    from helpers.planning import memory_plan as mp

    assert not mp.GPUS[gpu].native_bf16
    assert mp.precision_for(gpu) == choose(cuda=True, bf16=False) == "fp16"
    for name, card in mp.GPUS.items():
        assert mp.precision_for(name) == choose(cuda=True, bf16=card.native_bf16), name
    auto = plan_memory(TINY, "instruct", gpu=gpu)
    assert (auto.precision, auto.attention) == ("fp16 autocast", "efficient")
    bf16 = plan_memory(TINY, "instruct", gpu=gpu, precision="bf16")
    assert (bf16.precision, bf16.attention) == ("bf16 autocast", "math")  # emulated bf16: no efficient kernel
    assert plan_memory(TINY, "instruct", gpu=gpu, precision="fp32").precision == "fp32"
    with pytest.raises(ValueError, match="precision"):
        plan_memory(TINY, "instruct", gpu=gpu, precision="fp8")


def test_an_fp16_plan_holds_the_fp32_attention_copies(full_plans):
    """Stage 03 on a T4 at the same shape (the profile's batch of 1024-token rows, the memory-efficient kernel for all
    three): the fp16 plan holds what bf16 autocast holds plus, in every layer, the fp32 copies of q, k and v, the
    fp32 attention output and the fp32 padding bias that the course's attention function (SDPA in fp32) keeps for
    the backward pass: exactly 2 more bytes per element of each of the four B x T x hidden tensors and of the
    B x T x T bias. So bf16 < fp16 < fp32 (fp32 keeps every activation in 4 bytes).
    Bug caught: fp16 planned as bf16 (the meta model run with stock SDPA, or SDPA autocast to fp16 in the emulation:
    the fp32 copies missing and a T4's micro-batch sized too big), or fp16 planned with fp32 activations."""
    fp16 = full_plans[("instruct", "T4")]
    bf16, fp32 = (plan_memory(FULL, "instruct", gpu="T4", precision=p, attention="efficient")
                  for p in ("bf16", "fp32"))
    assert fp16.attention == "efficient"
    assert bf16.total_bytes < fp16.total_bytes < fp32.total_bytes
    b, t, d = fp16.batch_size, fp16.seq_length, FULL.phi.hidden_size
    per_layer = 4 * b * t * d * (4 - 2) + b * t * t * (4 - 2)  # q, k, v, output; the bias
    assert fp16.layer_max_bytes - bf16.layer_max_bytes == per_layer
    assert fp16.layer_sum_bytes - bf16.layer_sum_bytes == FULL.phi.num_hidden_layers * per_layer
    assert fp16.weights_total == bf16.weights_total  # 4-bit layers; the rest upcast to fp32 by peft either way


# ------------------------------------------------------------------ the H200 measurements (committed JSON only)
# Every measured peak is read from the committed benchmark results, never copied by hand: a hand-copied table here
# once held 79.3 GiB for stage 03 at 8 x 1024 without checkpointing (an earlier version of the course, quoted in a
# shared note), where the committed measurement of the current code (memory_peaks_h200.json) is 75.05 GiB.
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
PEAK_TOLERANCE_IN_SAMPLE = (1.00, 1.10)  # plan / measured: never below, at most 10 % above (the module's promise)
PEAK_TOLERANCE_HELD_OUT = (0.95, 1.10)  # the same with an allowance fitted without the configuration: 5 % under ok


def _h200_peaks() -> list[tuple[str, str, dict, float]]:
    """(configuration id, point id, plan_memory keywords, measured GiB) for every H200 peak behind
    MEASURED_EXTRA_GIB: each row of memory_peaks_h200.json twice (first micro-batch, and with the gradients kept
    for accumulation: one configuration, two points), and each way of qlora_step_h200.json (real LLaVA lengths,
    planned for its largest micro-batch, as the benchmark did)."""
    points = []
    for r in json.loads((RESULTS / "memory_peaks_h200.json").read_text())["rows"]:
        config = (f"{r['stage']}-{r['batch']}x{r['tokens']}-ckpt_{'on' if r['checkpointing'] else 'off'}-"
                  f"{r['attention']}-{r['loss']}")
        for accum, key in ((1, "peak_first"), (2, "peak_accum")):
            kw = dict(stage=r["stage"], batch_size=r["batch"], seq_length=r["tokens"],
                      gradient_checkpointing=r["checkpointing"], attention=r["attention"], loss=r["loss"],
                      grad_accum=accum)
            points.append((config, f"{config}-accum{accum}", kw, r[key]))
    qlora = json.loads((RESULTS / "qlora_step_h200.json").read_text())
    for w in qlora["ways"]:
        rows, length = (int(x) for x in w["planned_for"].split(" x "))
        config = f"qlora_step-{w['way']}-{rows}x{length}"
        kw = dict(stage="instruct", batch_size=rows, seq_length=length, gradient_checkpointing=w["checkpointing"],
                  attention="efficient", loss=w["loss"], grad_accum=w["grad_accum"])
        points.append((config, config, kw, w["peak_gib"]))
    return points


H200_PEAKS = _h200_peaks()


@pytest.fixture(scope="module")
def h200_plans():
    """point id -> (plan with the committed allowances, the count alone without MEASURED_EXTRA_GIB), in GiB."""
    plans = {}
    for _config, point, kw, _measured in H200_PEAKS:
        kw = dict(kw)
        plan = plan_memory(FULL, kw.pop("stage"), gpu="H200", **kw)
        plans[point] = (plan.total_bytes / GiB, (plan.total_bytes - plan.measured_extra_bytes) / GiB)
    return plans


@pytest.mark.parametrize("config,point,kw,measured", H200_PEAKS, ids=[p[1] for p in H200_PEAKS])
def test_regression_guard_plan_covers_the_h200_peaks_it_was_fitted_to(h200_plans, config, point, kw, measured):
    """REGRESSION GUARD, in sample: MEASURED_EXTRA_GIB was fitted to these very peaks (the smallest allowance that
    keeps each at or below the plan), so passing says nothing about a GPU or a configuration not measured; see
    test_allowance_fitted_without_a_configuration_plans_it for that. Bug caught: an accidental change to the
    allowances, ACTIVATION_MARGIN, the workspace or any count that moves a plan below a measured peak or more than
    10 % above it (e.g. MEASURED_EXTRA_GIB["projection"] 1.45 -> 1.0 leaves stage 02 at 16 x 512 under its peak)."""
    planned, _count = h200_plans[point]
    low, high = PEAK_TOLERANCE_IN_SAMPLE
    assert low * measured <= planned <= high * measured, (point, measured, planned)


def fit_measured_extra(residuals_gib) -> float:
    """The allowance rule of MEASURED_EXTRA_GIB, in its simplest honest form: the largest measured peak minus the
    counted plan among the fitting points (no rounding up, no margin; 0 if the count is never under)."""
    return max([0.0, *residuals_gib])


@pytest.mark.parametrize("stage", ["projection", "instruct"])
def test_allowance_fitted_without_a_configuration_plans_it(h200_plans, stage):
    """HELD OUT: for each measured configuration of the stage (6 for stage 02, 11 for stage 03), the allowance is
    refitted (fit_measured_extra) on the *other* configurations only and the held-out configuration's peaks are
    planned with it: they must be within PEAK_TOLERANCE_HELD_OUT (at most 5 % under, 10 % over) -- the evidence that
    the count plus one fitted constant per stage predicts a configuration it did not see. Bug caught: a counting
    error that treats one kind of configuration differently from the others (the second fp32 gradient of the
    logits, the recomputed layer under checkpointing, the gradients kept for accumulation, the SDPA kernel), which
    retuning MEASURED_EXTRA_GIB could hide from the in-sample guard but not from configurations left out of the
    fit."""
    points = [(c, p, m) for c, p, kw, m in H200_PEAKS if kw["stage"] == stage]
    configs = sorted({c for c, _p, _m in points})
    assert len(configs) >= 6
    low, high = PEAK_TOLERANCE_HELD_OUT
    misses = []
    for held in configs:
        allowance = fit_measured_extra(m - h200_plans[p][1] for c, p, m in points if c != held)
        for c, p, measured in points:
            if c == held:
                planned = h200_plans[p][1] + allowance
                if not low * measured <= planned <= high * measured:
                    misses.append((p, round(measured, 2), round(planned, 2), round(allowance, 2)))
    assert not misses, misses


def test_peak_is_the_loss_moment_with_full_logits_and_the_layers_with_the_answer_loss():
    """Both kernels peak alike at batch 4 with full logits: the peak is at the loss, not inside a layer. The
    answer-only loss removes the full-logits gradients, so the checkpointed peak moves into the layers and drops."""
    eff, math_ = (plan_memory(FULL, "instruct", gpu="H200", attention=a, loss="model", grad_accum=1)
                  for a in ("efficient", "math"))
    assert eff.peak_phase == "loss" and eff.loss_phase_bytes == math_.loss_phase_bytes
    old = plan_memory(FULL, "instruct", gpu="H200", batch_size=16, loss="model")
    new = plan_memory(FULL, "instruct", gpu="H200", batch_size=16, loss="answer")
    assert new.peak_phase == "layers" and new.total_bytes < 0.85 * old.total_bytes
    assert old.logits_transient_bytes == 2 * 4 * 16 * 1024 * 51200  # the two fp32 gradients of the full logits


def test_gradient_accumulation_keeps_the_gradients():
    one = plan_memory(FULL, "instruct", gpu="H200", grad_accum=1, loss="model")
    many = plan_memory(FULL, "instruct", gpu="H200", grad_accum=32, loss="model")
    assert many.persistent_bytes - one.persistent_bytes == one.gradient_bytes
    assert many.total_bytes > one.total_bytes



def test_the_command_line_plan_is_the_notebooks_plan(tmp_path, capsys):
    """``scripts/plan_memory.py`` prints and writes the plan that ``plan_memory`` makes for the same arguments."""
    import runpy

    out = tmp_path / "plan.json"
    script = runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts" / "plan_memory.py"))
    script["main"](["--stage", "projection", "--gpu", "T4", "--batch-size", "4", "--json", str(out)])
    written = json.loads(out.read_text())
    expected = plan_memory("full", "projection", gpu="T4", batch_size=4)
    assert written["total_bytes"] == expected.total_bytes and written["fits"] == expected.fits
    assert written["batch_size"] == 4 and "T4" in capsys.readouterr().out
