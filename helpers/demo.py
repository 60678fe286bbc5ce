"""Notebook 05 and ``app.py``: talk to the assistant about an image, by text or by voice.

* :class:`DemoBackend` is the UI-free logic: it checks the inputs (clear messages instead of crashes), turns
  speech into the question (Whisper, :mod:`helpers.models.asr`), renders the whole conversation with the course's chat
  template (the history really goes back into the model), and streams a greedy, KV-cached answer that stops at
  EOS (``TextIteratorStreamer`` + ``generate`` in a thread). Every prompt it gives the model is kept in
  ``backend.prompts`` and shown in the UI.
* :func:`build_app` wraps it in a ``gr.Blocks`` app; every event has an ``api_name`` (``/ask``,
  ``/ask_by_enter``, ``/clear``, ``/new_image``), so ``gradio_client`` can drive it.
* :func:`widget_demo` is a plain ipywidgets fallback for notebooks where gradio cannot be shown.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no calls home

from PIL import Image

from helpers.data.chat_template import prompt_for_next_answer, user_message
from helpers.models import asr as speech
from helpers.models import fast_generation
from helpers.models.inference import load_assistant
from helpers.stages import ensure_assistant
from helpers.views import reporting

NO_IMAGE = "Upload an image first: the assistant answers questions about a picture."
NO_QUESTION = "Type a question, or record or upload a spoken one."


class DemoInputError(ValueError):
    """Bad input from the user; the message is shown in the UI as it is."""


# ------------------------------------------------------------------------------------------------ inputs
def read_image(source) -> Image.Image:
    """A path, bytes or PIL image -> RGB PIL image, or :class:`DemoInputError` with a clear message."""
    if source is None or (isinstance(source, (str, bytes)) and not source):
        raise DemoInputError(NO_IMAGE)
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    name = "The uploaded file" if isinstance(source, (bytes, bytearray, memoryview)) else Path(source).name
    try:
        image = Image.open(io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview))
                           else source)
        image.load()
        return image.convert("RGB")
    except FileNotFoundError:
        raise DemoInputError(f"{name} was not found; upload the image again.") from None
    except Exception as exc:  # PIL.UnidentifiedImageError, truncated files, decompression bombs, ...
        raise DemoInputError(f"{name} is not an image that can be read ({type(exc).__name__}). "
                             "Upload a picture (JPEG, PNG, WebP, ...).") from None


def image_key(image: Image.Image) -> str:
    return hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()[:16]


def new_state() -> dict:
    """Per-session conversation: model-side messages, the chat as displayed, and which image it is about."""
    return {"image_key": None, "history": [], "chat": []}


@dataclass
class TurnLog:
    source: str  # "text" or "voice"
    question: str
    answer: str = ""
    asr_seconds: float = 0.0
    first_token_seconds: float = 0.0
    total_seconds: float = 0.0
    prompt_tokens: int = 0


@dataclass
class Update:
    """One step of a turn as the UI shows it."""

    chat: list
    status: str
    prompt: str = ""
    done: bool = False
    error: bool = False
    state: dict = field(default_factory=new_state)


# ----------------------------------------------------------------------------------------------- backend
class DemoBackend:
    def __init__(self, model, processor, asr=None, asr_loader=None, max_new_tokens: int = 64,
                 fast: bool | None = None):
        """`asr`: a :class:`helpers.models.asr.Transcriber`; or `asr_loader`, called on the first voice question and
        returning ``(transcriber or None, reason)``. `fast`: answer through ``helpers.models.fast_generation`` (static
        KV cache + compiled decoding step, compiled once in the background now); default: on a GPU."""
        self.model, self.processor = model.eval(), processor
        self.tokenizer = processor.tokenizer
        self.max_new_tokens = max_new_tokens
        self._asr, self._asr_error = asr, None
        self._asr_loader = asr_loader if asr is None else None
        self.context_length = _context_length(model)
        self.prompts: list[str] = []  # every prompt given to the model, in order (a hook for tests/learners)
        self.log: list[TurnLog] = []
        self._lock = threading.Lock()
        self.fast = None
        self.fast_status = "off"
        self._start_fast_generation(fast)

    # ------------------------------------------------------------------------------------ fast generation
    def _start_fast_generation(self, fast: bool | None):
        on_gpu = next(self.model.parameters()).device.type == "cuda"
        if fast is None:
            fast = on_gpu and fast_generation.enabled() and fast_generation.supports(self.model)[0]
        if not fast:
            return
        self.fast = fast_generation.FastGreedy(self.model, batch_size=1, max_cache_len=self.context_length)
        if not self.fast.compiled:
            self.fast_status = "ready (not compiled)"
            return
        self.fast_status = "compiling"
        print("Compiling the fast answer generator in the background (static KV cache + CUDA graph, once per "
              "session, about a minute); questions asked meanwhile wait for it.", flush=True)

        def done(gen):
            if gen.error is None:
                self.fast_status = f"ready (compiled in {gen.warm_up_seconds:.0f} s)"
            else:
                self.fast_status = f"off ({type(gen.error).__name__}: {gen.error})"
            print(f"Fast answer generator {self.fast_status}.", flush=True)

        def warm():
            with self._lock:  # no other generation while CUDA graphs are recorded
                self.fast.warm_up(on_done=done)

        threading.Thread(target=warm, daemon=True, name="demo-fast-generation").start()

    def _fast_ready(self) -> bool:
        return self.fast is not None and self.fast.usable()

    @classmethod
    def from_profile(cls, profile, paths, load_speech: bool = True, checkpoint=None):
        """The stage-03 assistant (trained on the spot with a NOTICE when missing; or the saved assistant at
        `checkpoint`, then `paths` is not used) + the profile's Whisper."""
        # in the course's precision (helpers.models.precision: bf16 / fp16 with fp32 attention scores / fp32)
        model, processor = load_assistant(checkpoint or ensure_assistant(profile, paths))
        loader = (lambda: speech.try_load_asr(profile)) if load_speech else (lambda: (None, "voice input is off"))
        return cls(model, processor, asr_loader=loader, max_new_tokens=profile.max_new_tokens)

    # --------------------------------------------------------------------------------------------- speech
    def asr(self):
        if self._asr is None and self._asr_loader is not None:
            self._asr, self._asr_error = self._asr_loader()
            self._asr_loader = None
        if self._asr is None:
            raise DemoInputError("Voice questions are not available: "
                                 + (self._asr_error or "no speech-recognition model is installed.")
                                 + " Type the question instead.")
        return self._asr

    def transcribe(self, audio) -> str:
        """Spoken question -> question text; every problem becomes a :class:`DemoInputError`."""
        try:
            samples = speech.load_audio(audio)
        except speech.AudioError as exc:
            raise DemoInputError(f"That audio cannot be used. {exc}") from None
        if speech.is_silent(samples):
            raise DemoInputError("The recording is silent: no speech to transcribe. Record the question again.")
        recogniser = self.asr()
        try:
            text = speech.transcript_to_question(recogniser.transcribe(samples))
        except Exception as exc:  # the recogniser itself failed: say so, keep the app alive
            raise DemoInputError(f"Speech recognition failed ({type(exc).__name__}: {exc}). "
                                 "Type the question instead.") from None
        if not text:
            raise DemoInputError("No words were recognised in the recording. Speak closer to the microphone.")
        return text

    # ------------------------------------------------------------------------------------------ one turn
    def turn(self, image, text: str | None = None, audio=None, state: dict | None = None):
        """Generator of :class:`Update` for one question. Never raises for bad input."""
        state = state if state is not None else new_state()
        chat = list(state["chat"])
        try:
            picture = read_image(image)
            key = image_key(picture)
            note = ""
            if state["image_key"] != key:  # another picture: a new conversation
                if state["image_key"] is not None:
                    note = "New image: the conversation starts again. "
                state = {"image_key": key, "history": [], "chat": []}
                chat = []
            log = TurnLog("text", "")
            if audio is not None and not (isinstance(audio, str) and not audio):
                log.source = "voice"
                start = time.perf_counter()
                question = self.transcribe(audio)
                log.asr_seconds = time.perf_counter() - start
            else:
                question = (text or "").strip()
                if not question:
                    raise DemoInputError(NO_QUESTION)
            log.question = question
            history = state["history"]
            prompt = prompt_for_next_answer(history, question, self.tokenizer.eos_token)
            inputs = self._inputs(picture, prompt)
            n_prompt = inputs["input_ids"].shape[1]
            room = self.context_length - n_prompt
            if room < 1:
                what = "question" if not history else "conversation"
                advice = "Ask a shorter question." if not history else "Press “Clear chat” to start again."
                raise DemoInputError(f"The {what} is too long for the model: {n_prompt} tokens (with the image) "
                                     f"of a {self.context_length}-token context. {advice}")
        except DemoInputError as exc:
            yield Update(chat, f"⚠️ {exc}", error=True, done=True, state=state)
            return
        shown = ("🎤 " if log.source == "voice" else "") + question
        chat = chat + [{"role": "user", "content": shown}, {"role": "assistant", "content": ""}]
        heard = f"Heard: “{question}” ({log.asr_seconds:.2f} s). " if log.source == "voice" else ""
        self.prompts.append(prompt)
        log.prompt_tokens = n_prompt
        if self.fast is not None and not self.fast.ready.is_set():
            yield Update(chat, note + heard + "⏳ The fast answer generator is being compiled (once per session, "
                         "about a minute); the answer follows.", prompt, state=state)
        answer, start = "", time.perf_counter()
        try:
            for answer in self._stream(inputs, min(self.max_new_tokens, room)):
                if not log.first_token_seconds:
                    log.first_token_seconds = time.perf_counter() - start
                chat[-1] = {"role": "assistant", "content": answer}
                yield Update(chat, note + heard + "answering…", prompt, state=state)
        except Exception as exc:  # a failure inside generate must not kill the app
            yield Update(chat[:-2], f"⚠️ The model failed to answer ({type(exc).__name__}: {exc}).", prompt,
                         error=True, done=True, state=state)
            return
        answer = answer.strip()
        log.answer = answer
        log.total_seconds = time.perf_counter() - start
        self.log.append(log)
        chat[-1] = {"role": "assistant", "content": answer or "(no answer: the model stopped at once)"}
        state = {"image_key": state["image_key"], "chat": chat,
                 "history": history + [user_message(question, with_image=not history),
                                       {"role": "assistant", "content": answer}]}
        yield Update(chat, f"{note}{heard}Answered in {log.total_seconds:.2f} s.", prompt, done=True, state=state)

    def ask(self, image, text=None, audio=None, state=None) -> Update:
        """The last update of :meth:`turn` (no streaming)."""
        update = None
        for update in self.turn(image, text, audio, state):
            pass
        return update

    # ------------------------------------------------------------------------------------------ generation
    def _inputs(self, image: Image.Image, prompt: str) -> dict:
        inputs = self.processor(images=[image], text=[prompt], return_tensors="pt")
        device = next(self.model.parameters()).device
        vision_dtype = next(self.model.model.vision_tower.parameters()).dtype
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(vision_dtype)
        return inputs

    def _stream(self, inputs: dict, max_new_tokens: int):
        """Yield the answer so far while ``generate`` runs in a thread (greedy, KV cache, stops at EOS)."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        failure = []

        def run():
            try:
                if self._fast_ready():
                    try:
                        self.fast.generate(inputs["input_ids"], inputs.get("attention_mask"),
                                           inputs.get("pixel_values"), streamer=streamer,
                                           max_new_tokens=max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                                           pad_token_id=self.tokenizer.pad_token_id)
                    except Exception as exc:  # the next questions use model.generate
                        self.fast.error = exc
                        self.fast_status = f"off ({type(exc).__name__}: {exc})"
                        raise
                else:
                    self.model.generate(**inputs, streamer=streamer, max_new_tokens=max_new_tokens, do_sample=False,
                                        use_cache=True, eos_token_id=self.tokenizer.eos_token_id,
                                        pad_token_id=self.tokenizer.pad_token_id)
            except Exception as exc:  # re-raised in the caller's thread
                failure.append(exc)
                streamer.on_finalized_text("", stream_end=True)

        with self._lock:  # one generation at a time on the one model
            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            text, pieces = "", 0
            for piece in streamer:
                text, pieces = text + piece, pieces + 1
                yield text
            thread.join()
        if failure:
            raise failure[0]
        if pieces == 0:  # the model said EOS at once
            yield ""

    # ------------------------------------------------------------------------------------------ gradio glue
    def gradio_turn(self, image, text, audio, state):
        import gradio as gr

        for u in self.turn(image, text, audio, state):
            clear = u.done and not u.error
            yield (u.chat, u.state, u.status, u.prompt if u.prompt else gr.skip(),
                   "" if clear else gr.skip(), None if clear else gr.skip())

    def gradio_clear(self, state):
        return [], new_state(), "Chat cleared: ask a new question.", ""

    def gradio_new_image(self, image, state):
        import gradio as gr

        if image is None:
            return [], new_state(), "", ""
        try:
            key = image_key(read_image(image))
        except DemoInputError as exc:
            return gr.skip(), state, f"⚠️ {exc}", gr.skip()
        if state and state.get("image_key") == key:
            return gr.skip(), state, gr.skip(), gr.skip()
        return [], {**new_state(), "image_key": key}, "New image: ask a question about it.", ""


def _context_length(model) -> int:
    config = model.config
    text = getattr(config, "text_config", config)
    return int(getattr(text, "max_position_embeddings", 2048))


# ------------------------------------------------------------------------------------------------- gradio
def _checked_image_class():
    import gradio as gr

    class CheckedImage(gr.Image):
        """``gr.Image`` whose uploads are checked by the app, so a non-image file gets the app's clear message
        instead of failing inside gradio's own PIL call. Same front end as ``gr.Image`` (a template component)."""

        is_template = True

        def preprocess(self, payload):
            try:
                return super().preprocess(payload)
            except Exception:
                return str(payload.path) if payload is not None and payload.path else None

    return CheckedImage


def build_app(backend: DemoBackend, title: str = "mmphi · ask about an image") -> "gr.Blocks":
    import gradio as gr

    CheckedImage = _checked_image_class()
    with gr.Blocks(title=title) as app:
        gr.Markdown(f"## {title}\nUpload an image, then ask by **typing** or by **voice** (record or upload). "
                    "The whole conversation goes back to the model at every turn; a new image starts a new one.")
        state = gr.State(new_state())
        with gr.Row():
            with gr.Column(scale=1):
                image = CheckedImage(type="filepath", label="Image", sources=["upload", "clipboard"], height=260)
                audio = gr.Audio(sources=["microphone", "upload"], type="filepath", format=None,
                                 label="Ask by voice")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Conversation", height=340)
                question = gr.Textbox(label="Ask by text", placeholder="What colour is the square?")
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary")
                    clear = gr.Button("Clear chat")
                status = gr.Markdown()
                with gr.Accordion("Prompt given to the model (chat template)", open=False):
                    prompt = gr.Textbox(show_label=False, lines=6, interactive=False)
        turn_io = dict(inputs=[image, question, audio, state],
                       outputs=[chatbot, state, status, prompt, question, audio], concurrency_id="model")
        ask.click(backend.gradio_turn, api_name="ask", **turn_io)
        question.submit(backend.gradio_turn, api_name="ask_by_enter", **turn_io)
        clear.click(backend.gradio_clear, inputs=[state], outputs=[chatbot, state, status, prompt], api_name="clear")
        image.change(backend.gradio_new_image, inputs=[image, state], outputs=[chatbot, state, status, prompt],
                     api_name="new_image")
    app.backend = backend
    return app


def launch(app, share: bool = False, **kwargs):
    """Inline in Jupyter/Colab/SageMaker without blocking the kernel. ``share=True`` opens a public gradio.live link
    (anyone who has it can use the assistant while it runs; in Colab the browser's microphone needs it): opt-in."""
    options = dict(share=share, prevent_thread_lock=True)
    options.update(kwargs)
    return app.launch(**options)


# --------------------------------------------------------------------------------------------- ipywidgets
def _uploaded(widget):
    """(bytes, file name) of an ipywidgets FileUpload's first file, or (None, None)."""
    value = widget.value
    if not value:
        return None, None
    item = value[0] if isinstance(value, (tuple, list)) else next(iter(value.values()))
    content = item["content"] if isinstance(item, dict) else item.content
    name = item["name"] if isinstance(item, dict) else item.name
    return bytes(content), name


def widget_demo(backend: DemoBackend):
    """The same chat with plain ipywidgets (FileUpload for image and audio, Text, Button, Output)."""
    import ipywidgets as w

    image_in = w.FileUpload(accept="image/*", multiple=False, description="Image")
    audio_in = w.FileUpload(accept="audio/*", multiple=False, description="Audio question")
    text_in = w.Text(placeholder="What colour is the square?", description="Question")
    ask, clear = w.Button(description="Ask", button_style="primary"), w.Button(description="Clear chat")
    out = w.Output()
    box = w.VBox([w.HBox([image_in, audio_in]), text_in, w.HBox([ask, clear]), out])
    box.state = new_state()

    def on_ask(_=None):
        image_bytes, _ = _uploaded(image_in)
        audio_bytes, audio_name = _uploaded(audio_in)
        audio_path = None
        if audio_bytes is not None:
            tmp = tempfile.NamedTemporaryFile(suffix=Path(audio_name or "a.wav").suffix or ".wav", delete=False)
            tmp.write(audio_bytes)
            tmp.close()
            audio_path = tmp.name
        update = None
        with out:
            out.clear_output()
            for update in backend.turn(image_bytes, text_in.value, audio_path, box.state):
                pass
            for m in update.chat:
                print(("USER: " if m["role"] == "user" else "ASSISTANT: ") + m["content"])
            print(update.status)
        box.state = update.state
        if update.done and not update.error:
            text_in.value = ""
            audio_in.value = ()
        if audio_path:
            os.unlink(audio_path)
        return update

    def on_clear(_=None):
        box.state = new_state()
        out.clear_output()

    ask.on_click(on_ask)
    clear.on_click(on_clear)
    box.ask, box.clear = on_ask, on_clear  # callable from code (and tests)
    box.inputs = {"image": image_in, "audio": audio_in, "text": text_in}
    return box


# -------------------------------------------------------------------------------------------------- plots
def plot_latency(log: list[TurnLog], path=None):
    """Seconds per turn: speech recognition, time to the first answer token, the rest of the answer."""
    import matplotlib.pyplot as plt

    labels = [f"{i + 1}: {t.source}\n{t.question[:22]}" for i, t in enumerate(log)]
    asr = [t.asr_seconds for t in log]
    first = [t.first_token_seconds for t in log]
    rest = [max(0.0, t.total_seconds - t.first_token_seconds) for t in log]
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    ax.bar(labels, asr, label="speech recognition", color="#dd8452")
    ax.bar(labels, first, bottom=asr, label="until the first streamed words (prompt + image)", color="#4c72b0")
    ax.bar(labels, rest, bottom=[a + f for a, f in zip(asr, first)], label="rest of the answer (KV cache)",
           color="#55a868")
    ax.set_ylabel("seconds")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return reporting.save_and_show(fig, path)
