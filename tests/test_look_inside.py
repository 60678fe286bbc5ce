"""The notebooks' look-inside views show the real objects: the numbers they print are the model's own."""
from __future__ import annotations

from PIL import Image

from helpers.data.chat_template import user_message
from helpers.requirements_check import import_or_skip_or_fail
from helpers.views import look_inside


def test_token_table_lists_the_tokenizers_own_ids(tok):
    rows = look_inside.token_table(tok, "What colour is the square?")
    assert [r["id"] for r in rows] == tok("What colour is the square?", add_special_tokens=False)["input_ids"]


def test_packing_view_counts_whole_documents_and_padding(tok):
    docs = ["one red circle.", "two blue squares, at the top left and the top right.", "hello"]
    out = look_inside.show_packing(tok, docs, block_size=40)
    assert sum(out["real_tokens"]) == sum(out["lengths"])  # every token of every document, each with its EOS


def test_label_mask_marks_exactly_the_answers(tok, profile):
    messages = [user_message("What colour is it?", with_image=True), {"role": "assistant", "content": "red"},
                {"role": "user", "content": "And the shape?"}, {"role": "assistant", "content": "circle"}]
    out = look_inside.show_label_mask(tok, messages, profile.image_seq_length)
    answers = len(tok(" red<|endoftext|>", add_special_tokens=False)["input_ids"]) + \
        len(tok(" circle<|endoftext|>", add_special_tokens=False)["input_ids"])
    assert out["targets"] == answers
    from helpers.data.encoding import encode_conversation

    enc = encode_conversation(tok, messages, profile.image_seq_length)
    page = look_inside.label_mask_html(tok, enc["input_ids"], enc["labels"], 1)
    assert page.count("#b7e4a8") == answers + 1  # one span per target token, plus the legend
    assert f"[{profile.image_seq_length} image tokens]" in page


def test_image_journey_shapes_are_the_models(llava, processor, profile):
    shapes = look_inside.image_journey(llava, processor, Image.new("RGB", (64, 64), (200, 20, 20)),
                                       profile.vision_feature_layer, "USER: <image>\nWhat is it? ASSISTANT:")
    assert shapes["placeholders"] == profile.image_seq_length == shapes["features"][1]
    assert shapes["projected"] == (profile.image_seq_length, llava.config.text_config.hidden_size)
    assert look_inside.projector_summary(llava)["parameters"] == sum(
        p.numel() for p in llava.model.multi_modal_projector.parameters())


def test_lora_and_4bit_views(saved_llava, profile):
    from conftest import qlora_model

    model = qlora_model(saved_llava, profile)
    out = look_inside.lora_report(model)
    look_inside.show_lora(out)
    assert set(out["targets"]) == {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}
    assert 0 < out["lora"] < out["trainable"] < out["total"]
    sizes = look_inside.nf4_layer_report(model)
    look_inside.show_nf4(sizes)
    assert 4.0 < 8 * sizes["nf4_bytes"] / sizes["weights"] < 4.6  # nf4: 4 bits + block scales


def test_speech_view_shows_whispers_own_features():
    import numpy as np

    import_or_skip_or_fail("whisper", "openai-whisper is not installed (pip install -e '.[audio]')")
    tone = np.sin(np.linspace(0, 2000 * np.pi, 16000)).astype(np.float32)  # one second
    assert look_inside.log_mel(tone).shape == (80, 100)  # 80 mel bins, 10 ms frames
    assert look_inside.plot_speech(tone, 16000, "a tone") == (80, 100)


def test_grounding_view_reads_the_attention_of_the_position_that_starts_the_answer(saved_llava, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from helpers.data.chat_template import prompt_for_next_answer
    from helpers.data.multimodal_data import Record

    model = LlavaForConditionalGeneration.from_pretrained(saved_llava, attn_implementation="sdpa").eval()
    eager = LlavaForConditionalGeneration.from_pretrained(saved_llava, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(saved_llava)
    image = Image.new("RGB", (64, 64), (200, 20, 20))
    prompt = prompt_for_next_answer([], "What colour is the square?")
    grid = look_inside.image_attention(model, processor, image, prompt)
    assert model.config._attn_implementation == "sdpa"  # the view puts the fast kernel back
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    on_image = (inputs["input_ids"][0] == eager.config.image_token_id).nonzero().flatten()
    expected = torch.stack([a[0, :, -1, on_image] for a in attentions]).mean(dim=(0, 1))
    assert grid.shape == (2, 2) and torch.allclose(grid.flatten(), expected, atol=1e-6)
    assert 0 < float(grid.sum()) < 1  # the rest of the attention is on the text

    image.save(tmp_path / "a.jpg")
    rows = [{"image": "a.jpg", "turn": 1, "type": "place", "question": "What is in the top left cell?",
             "expected": "red square", "predicted": "blue circle", "correct": False},
            {"image": "a.jpg", "turn": 0, "type": "colour", "question": "What colour is the square?",
             "expected": "red", "predicted": "blue", "correct": False},
            {"image": "a.jpg", "turn": 0, "type": "place", "question": "What is in the top left cell?",
             "expected": "red square", "predicted": "red square", "correct": True},
            {"image": "a.jpg", "turn": 0, "type": "attribute", "question": "What colour is the square?",
             "expected": "red", "predicted": "blue", "correct": False}]
    cases = look_inside.grounding_cases(rows, [Record(tmp_path / "a.jpg", [])], prefer_types=("place", "attribute"))
    assert [(c["question"], c["predicted"]) for c in cases] == [("What is in the top left cell?", "red square"),
                                                                ("What colour is the square?", "blue")]
    assert cases[0]["prompt"] == prompt_for_next_answer([], "What is in the top left cell?")
    shown = look_inside.show_grounding(model, processor, cases, path=tmp_path / "g.png")
    assert [s["right"] for s in shown] == [True, False] and (tmp_path / "g.png").exists()
    assert abs(sum(map(sum, shown[0]["grid"])) - 1) < 1e-5
