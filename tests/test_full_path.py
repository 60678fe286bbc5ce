"""Defects of the full path that a CPU can catch: precision on a T4, the merged export's memory, missing stages,
gradient checkpointing's reentrancy, evaluation batch size, and the full-scale scores (POPE, free-form rule)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from helpers.config import FULL

ROOT = Path(__file__).resolve().parent.parent


def test_bf16_is_not_chosen_on_a_t4_that_only_emulates_it(monkeypatch):
    """A T4 reports bf16 support through emulation: the policy must see it as a GPU without native bf16 (fp16)."""
    from helpers.models import precision

    monkeypatch.delenv(precision.PRECISION_ENV, raising=False)

    def t4_bf16(including_emulation: bool = True):  # what torch reports on a T4 (compute capability 7.5)
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", t4_bf16)
    assert precision.native_bf16() is False and precision.current().name == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert precision.native_bf16() is True and precision.current().name == "bf16"


def test_the_merged_export_reloaded_from_disk_equals_the_trained_model(saved_llava, processor, profile, world,
                                                                         tmp_path, monkeypatch):
    """The folder ``export_merged`` writes, reloaded with stock ``AutoModelForImageTextToText`` / ``AutoProcessor``
    only (what notebooks 04-05, a Space or lmms-eval load), answers like the trained 4-bit + LoRA model: logits on a
    held-out image and prompt within ``EXPORT_TOLERANCE`` (fp32 on a CPU), while the adapters and the projector each
    move the logits far more than that. The export is built where it runs (explicit dtype and device_map; the old
    export built Phi-2 in fp32 on the host, ~11 GB), and ``check_export`` (run by stage 03 on every export) raises
    on an export that does not match.

    Catches: an export saved before the LoRA merge or before the trained projector is copied in (the folder holds
    the stage-02 model), a merge that drops the LoRA scaling or the projector's trained copy, and a test or stage
    that scores the in-memory model instead of what was written."""
    from conftest import qlora_model
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    from helpers.data.chat_template import prompt_for_next_answer
    from helpers.data.multimodal_data import read_llava_instruct
    from helpers.train import instruct

    model = qlora_model(saved_llava, profile)
    with torch.no_grad():  # stands for training: adapters and the projector's trainable copy away from their start
        for name, p in model.named_parameters():
            if "lora_B" in name or ("modules_to_save" in name and "multi_modal_projector" in name):
                p.add_(torch.randn_like(p) * 0.05)
    calls = []
    original = LlavaForConditionalGeneration.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", classmethod(spy))
    instruct.export_merged(model, saved_llava, tmp_path / "merged", processor)
    assert calls and calls[0]["dtype"] == torch.float32 and calls[0]["device_map"] == {"": "cpu"}
    monkeypatch.undo()

    records, _ = read_llava_instruct(world.instruct("val"), world.images("val"))
    image = Image.open(records[0].image).convert("RGB")
    prompt = prompt_for_next_answer([], records[0].messages[0]["content"].split("\n", 1)[-1],
                                    processor.tokenizer.eos_token)
    trained = instruct.prompt_logits(model, processor, image, prompt)
    with model.disable_adapter():  # the stage-02 model: neither adapters nor the trained projector copy
        untrained = instruct.prompt_logits(model, processor, image, prompt)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path / "merged")
    check = instruct.check_export(trained, reloaded, reloaded_processor, image, prompt)
    assert check["dtype"] == "float32" and check["relative"] <= instruct.EXPORT_TOLERANCE[torch.float32]
    # the check can fail: the training moved the logits 20x further than the tolerance
    assert (trained - untrained).abs().max() > 20 * check["tolerance"] * check["max_abs_logit"]
    with pytest.raises(instruct.ExportMismatch, match="does not answer like the trained model"):
        instruct.check_export(untrained, reloaded, reloaded_processor, image, prompt)

    from helpers.models import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    t4 = precision.current()  # a T4 builds, stores and answers with the export in fp16, attention scores in fp32
    assert (t4.device, t4.dtype, t4.attention) == ("cuda:0", torch.float16, precision.FP32_ATTENTION)


def test_the_assistant_is_reloaded_with_dtype_and_device_map_everywhere(monkeypatch, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from helpers import demo
    from helpers.models import inference
    from helpers.scoring import audio_eval

    seen = {}

    class Stub(torch.nn.Module):
        def eval(self):
            return self

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained",
                        lambda path, **kw: seen.update(kw) or Stub())
    monkeypatch.setattr(AutoProcessor, "from_pretrained", lambda path, **kw: "processor")
    model, processor = inference.load_assistant(tmp_path)
    assert seen["dtype"] == torch.float32 and seen["device_map"] == {"": "cpu"} and seen["attn_implementation"] == "sdpa"
    import inspect

    loaders = [inspect.getsource(demo), *(c["source"] for c in json.loads(
        (ROOT / "04_audio_pipeline.ipynb").read_text())["cells"] if c["cell_type"] == "code")]
    assert all("AutoModelForImageTextToText.from_pretrained" not in "".join(s) for s in loaders)  # none loads bare
    assert "load_assistant(" in loaders[0] and any("load_assistant(" in "".join(s) for s in loaders[1:])
    assert "from_pretrained" not in inspect.getsource(audio_eval)  # notebook 04 hands it the loaded assistant


def test_a_missing_earlier_stage_stops_with_its_cost_instead_of_training_for_hours(tmp_path, monkeypatch):
    from helpers import stages
    from helpers.config import Paths

    monkeypatch.setattr(stages, "run_notebook", lambda *a, **k: pytest.fail("started training"))
    paths = Paths(FULL, tmp_path)
    with pytest.raises(stages.MissingStageError) as err:
        stages.ensure_projection(FULL, paths)
    message = str(err.value)
    assert "no stage-02 checkpoint" in message and "02_projection.ipynb" in message
    assert "train_missing_stages" in message and "would take" in message
    ran = []
    monkeypatch.setattr(stages, "run_notebook", lambda name, **k: ran.append((name, k["stop_after"])))
    stages.ensure_projection(FULL.replace(train_missing_stages=True), paths)
    assert ran == [("02_projection", "evaluate")]


def test_gradient_checkpointing_passes_use_reentrant_explicitly(saved_llava, profile):
    from conftest import qlora_model

    from helpers.data.chat_template import user_message
    from helpers.data.encoding import PadCollator, encode_conversation

    model = qlora_model(saved_llava, profile.replace(gradient_checkpointing=True))
    model.train()
    tok = model.get_base_model().config  # noqa: F841 (the model is what matters)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(saved_llava)
    messages = [user_message("What shape?", with_image=True), {"role": "assistant", "content": "circle"}]
    batch = PadCollator(tokenizer.pad_token_id)([encode_conversation(tokenizer, messages, profile.image_seq_length)])
    pixels = torch.rand(1, 3, profile.vision.image_size, profile.vision.image_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(**batch, pixel_values=pixels).loss.backward()
    assert not [w for w in caught if "use_reentrant" in str(w.message)]


def test_evaluation_batch_fits_the_free_memory_of_a_t4_after_training():
    from types import SimpleNamespace

    from helpers.models.inference import generation_batch_size

    phi2 = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=32, hidden_size=2560, intermediate_size=10240,
                                                  vocab_size=51200), parameters=lambda: iter([torch.zeros(1)]))
    small = generation_batch_size(phi2, tokens_per_row=1100, free_bytes=3 * 2 ** 30)  # T4 after training
    assert 1 <= small < 32
    assert generation_batch_size(phi2, tokens_per_row=1100, free_bytes=120 * 2 ** 30) == 32  # an H200


def test_pope_scores_follow_the_paper():
    from helpers.scoring.evaluation import pope_answer, pope_metrics

    assert pope_answer("Yes, there is a dog.") == "yes"
    assert pope_answer("There is no dog in the image.") == "no"
    assert pope_answer("No") == "no" and pope_answer("It's not there") == "no"
    rows = ([{"category": "random", "expected": "yes", "predicted": "yes"}] * 3
            + [{"category": "random", "expected": "no", "predicted": "yes"}]
            + [{"category": "popular", "expected": "no", "predicted": "no"}] * 2
            + [{"category": "popular", "expected": "yes", "predicted": "no"}])
    m = pope_metrics(rows)
    assert m["random"]["precision"] == 0.75 and m["random"]["recall"] == 1.0 and m["random"]["yes_ratio"] == 1.0
    assert m["popular"]["accuracy"] == pytest.approx(2 / 3) and m["popular"]["f1"] == 0.0
    assert m["overall"]["n"] == 7 and m["overall"]["accuracy"] == pytest.approx(5 / 7)


def test_free_form_answers_are_judged_by_content_words():
    from helpers.scoring.evaluation import judge_freeform

    reference = "The bus in the image is white and red."
    assert judge_freeform("It is a red and white bus.", reference)["correct"]
    assert judge_freeform("A bus, white.", reference)["recall"] == pytest.approx(2 / 3)
    assert not judge_freeform("There is a green car.", reference)["correct"]
    assert judge_freeform("There are 2 dogs", "two dogs")["recall"] == 1.0


def test_evaluating_during_training_does_not_break_4bit_training_on_a_cpu(saved_llava, profile):
    """bitsandbytes repacks 4-bit weights for inference on CPUs with AVX512-BF16 at the first no-grad eval forward;
    training after that fails. Stage 03 evaluates at every checkpoint, so the trainable layout is kept."""
    import bitsandbytes as bnb
    from conftest import qlora_model
    from transformers import AutoTokenizer

    from helpers.data.chat_template import user_message
    from helpers.data.encoding import PadCollator, encode_conversation

    model = qlora_model(saved_llava, profile)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    tokenizer = AutoTokenizer.from_pretrained(saved_llava)
    messages = [user_message("What shape?", with_image=True), {"role": "assistant", "content": "circle"}]
    batch = PadCollator(tokenizer.pad_token_id)([encode_conversation(tokenizer, messages, profile.image_seq_length)])
    pixels = torch.rand(1, 3, profile.vision.image_size, profile.vision.image_size)
    model.eval()
    with torch.no_grad():
        model(**batch, pixel_values=pixels)  # a validation forward
    model.train()
    model(**batch, pixel_values=pixels).loss.backward()  # training goes on
