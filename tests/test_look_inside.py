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
