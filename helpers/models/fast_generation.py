"""Greedy answers near the hardware's speed: a static KV cache and a compiled one-token decoding step.

At batch 1 (a chat turn) ``model.generate`` with the dynamic cache is bound by kernel launches, not by the GPU: on
an H200 Phi-2 gave 41-49 tokens/s where reading the weights once per token would allow ~860, and the KV cache
gained only 1.04x. transformers' documented remedy (the "Optimizing inference" guide, "Static kv-cache and
torch.compile", custom decoding loop) is what this module does:

* a :class:`transformers.StaticCache` sized once (batch x max_cache_len), reset between calls, so every decoding
  step has the same shapes and addresses;
* the prompt (image + text) goes through the ordinary LLaVA forward once (the prefill, not compiled: its length
  varies);
* each further token is one call of a small function – language model on the last token, LM head, greedy argmax –
  compiled with ``torch.compile(mode="reduce-overhead", fullgraph=True)``, i.e. replayed as one CUDA graph;
* the compilation is paid once per (batch size, cache length): :meth:`FastGreedy.warm_up` does it ahead of the first
  question (in the background in the demo, with a message), not per question.

Greedy decoding and EOS handling follow ``generate`` exactly (positions from the attention mask, tokens after EOS
replaced by the pad token, ``min_new_tokens`` by forbidding EOS): on a CPU, uncompiled and in fp32, it produces the
same tokens as ``model.generate(do_sample=False)`` – a test checks it for a left-padded batch. Without CUDA nothing
is compiled and ``generate_greedy`` simply calls ``model.generate``.
"""
from __future__ import annotations

import inspect
import os
import threading
import time
import weakref

import torch

FAST_ENV = "MMPHI_FAST_GENERATION"  # "0" turns the fast path off


def supports(model) -> tuple[bool, str]:
    """Whether the fast path can serve `model`: a plain LLaVA (no peft wrapper, no 4-bit layers)."""
    if hasattr(model, "get_base_model") or hasattr(model, "peft_config"):
        return False, "a peft model (merge the adapters first)"
    if not (hasattr(model, "model") and hasattr(model.model, "language_model") and hasattr(model, "lm_head")):
        return False, "not a LLaVA-style model"
    if any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules()):
        return False, "quantized layers"
    return True, ""


def _cache_kwarg(fn) -> str:
    """transformers >= 5.2x calls the cache argument `cache` (`past_key_values` is deprecated); older: the latter."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_length_bucket(needed: int, context: int) -> int:
    """Static cache lengths come in a few sizes (each size is compiled once): 256, 512, 1024, ... up to the context."""
    size = 256
    while size < needed and size < context:
        size *= 2
    return min(max(size, needed), context) if needed <= context else needed


class FastGreedy:
    """Greedy generation for one LLaVA model with a static cache and a compiled decoding step.

    ``batch_size``: the compiled step's batch (smaller batches are padded to it, so one graph serves all);
    ``max_cache_len``: prompt + answer tokens the cache holds (default: the model's context);
    ``compile``: default True on CUDA, False elsewhere (then the same loop runs eagerly); ``pad_to_batch``: pad
    smaller batches to ``batch_size`` (default: when compiled); ``backend``: torch.compile's ("eager" traces the
    step with dynamo without generating code: the CPU test that the step compiles as one graph)."""

    def __init__(self, model, batch_size: int = 1, max_cache_len: int | None = None, compile: bool | None = None,
                 mode: str | None = "reduce-overhead", pad_to_batch: bool | None = None, backend: str = "inductor"):
        ok, why = supports(model)
        if not ok:
            raise ValueError(f"FastGreedy cannot serve this model: {why}")
        self.model = model
        self.lm = model.model.language_model
        self.head = model.lm_head
        config = model.config
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.context = int(getattr(text, "max_position_embeddings", 2048))
        self.batch_size = batch_size
        self.max_cache_len = max_cache_len or self.context
        device = next(model.parameters()).device
        self.compiled = (device.type == "cuda") if compile is None else compile
        self.pad_to_batch = self.compiled if pad_to_batch is None else pad_to_batch
        self.mode = mode
        self.cache = None
        self._lm_cache_kw = _cache_kwarg(self.lm.forward)
        self._top_cache_kw = _cache_kwarg(model.forward)
        self.backend = backend
        if self.compiled:  # fullgraph: a graph break would silently give up most of the speed; fail loudly instead
            options = {"mode": mode} if backend == "inductor" and mode else {}
            self._step = torch.compile(self._decode, backend=backend, fullgraph=True, **options)
        else:
            self._step = self._decode
        self.ready = threading.Event()
        if not self.compiled:
            self.ready.set()
        self.warm_up_seconds = None
        self.error: Exception | None = None
        self.lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ the loop
    def _decode(self, token, position_ids, attention_mask, cache, eos_bias):
        out = self.lm(input_ids=token, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, **{self._lm_cache_kw: cache})
        logits = self.head(out.last_hidden_state[:, -1, :]).float() + eos_bias
        return logits.argmax(dim=-1)

    def _new_cache(self):
        from transformers import StaticCache

        return StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, max_new_tokens: int = 32, eos_token_id=None,
                 pad_token_id: int | None = None, min_new_tokens: int = 0, streamer=None, **_) -> torch.Tensor:
        """Like ``model.generate(..., do_sample=False)``: the prompt followed by the new tokens (rows that ended are
        filled with `pad_token_id`), shape (batch, prompt + generated)."""
        with self.lock:
            return self._generate(input_ids, attention_mask, pixel_values, max_new_tokens, eos_token_id,
                                  pad_token_id, min_new_tokens, streamer)

    def _generate(self, input_ids, attention_mask, pixel_values, max_new_tokens, eos_token_id, pad_token_id,
                  min_new_tokens, streamer):
        device = input_ids.device
        rows, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if length + max_new_tokens > self.max_cache_len:
            raise ValueError(f"prompt {length} + {max_new_tokens} new tokens exceed the static cache "
                             f"({self.max_cache_len}); make a FastGreedy with a larger max_cache_len")
        if rows > self.batch_size:
            raise ValueError(f"batch {rows} is larger than this generator's batch_size {self.batch_size}")
        batch = self.batch_size if self.pad_to_batch else rows
        if batch > rows:  # pad with copies of the last row so the compiled step keeps its shapes
            extra = batch - rows
            input_ids = torch.cat([input_ids, input_ids[-1:].expand(extra, -1)])
            attention_mask = torch.cat([attention_mask, attention_mask[-1:].expand(extra, -1)])
            if pixel_values is not None:
                pixel_values = torch.cat([pixel_values, pixel_values[-1:].expand(extra, *pixel_values.shape[1:])])
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else
                                               list(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        vocab = self.head.out_features
        no_eos = torch.zeros(vocab, device=device, dtype=torch.float32)
        forbid_eos = no_eos.clone()
        if eos:
            forbid_eos[eos] = float("-inf")
        eos_ids = torch.tensor(eos or [-1], device=device)

        if self.cache is None or getattr(self.cache.layers[0], "batch_size", batch) != batch:
            self.cache = self._new_cache()
        else:
            self.cache.reset()
        # positions as generate makes them: cumulative sum of the mask, 0 on left padding
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        full_mask = torch.ones(batch, self.max_cache_len, dtype=attention_mask.dtype, device=device)
        full_mask[:, :length] = attention_mask

        if streamer is not None:
            streamer.put(input_ids[:rows].cpu())
        prefill = self.model(input_ids=input_ids, attention_mask=full_mask, position_ids=position_ids,
                             pixel_values=pixel_values, use_cache=True, logits_to_keep=1,
                             **{self._top_cache_kw: self.cache})
        bias = forbid_eos if min_new_tokens > 0 else no_eos
        token = (prefill.logits[:, -1, :].float() + bias).argmax(dim=-1)
        new = torch.full((batch, max_new_tokens), pad, dtype=input_ids.dtype, device=device)
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        done_at = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)  # tokens until EOS
        last_position = position_ids[:, -1:]
        n = 0
        for step in range(max_new_tokens):
            token = torch.where(unfinished, token, torch.full_like(token, pad))
            new[:, step] = token
            n = step + 1
            if streamer is not None:
                streamer.put(token[:rows].cpu())
            ended = unfinished & torch.isin(token, eos_ids)
            done_at = torch.where(ended, torch.full_like(done_at, step + 1), done_at)
            unfinished &= ~ended
            if step + 1 == max_new_tokens:
                break
            if (streamer is not None or step % 4 == 3) and not bool(unfinished[:rows].any()):
                break
            last_position = last_position + 1
            bias = forbid_eos if step + 1 < min_new_tokens else no_eos
            if self.compiled and (self.backend == "cudagraphs" or self.mode == "reduce-overhead"):
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten now
            token = self._step(token[:, None].clone(), last_position, full_mask, self.cache, bias).clone()
        if streamer is not None:
            streamer.end()
        # generate stops at the step where the last row ended; rows that ended earlier are padded after their EOS
        n = min(n, int(done_at[:rows].max()))
        return torch.cat([input_ids[:rows], new[:rows, :n]], dim=1)

    # ------------------------------------------------------------------------------------------------ warm-up
    def warm_up(self, prompt_length: int | None = None, background: bool = False, on_done=None):
        """Compile (and record the CUDA graph of) the decoding step by generating a few tokens for a dummy image
        prompt. ``background=True`` returns the thread at once; :attr:`ready` is set when done (``on_done(self)``
        is called either way; :attr:`error` holds a failure, after which :meth:`usable` is False)."""
        def run():
            start = time.perf_counter()
            try:
                config = self.model.config
                n_img = getattr(config, "image_seq_length", 1)
                length = prompt_length or (n_img + 16)
                device = next(self.model.parameters()).device
                ids = torch.full((1, length), 0, dtype=torch.long, device=device)
                ids[0, 1:1 + n_img] = config.image_token_id
                vision = config.vision_config
                dtype = next(self.model.model.vision_tower.parameters()).dtype
                pixels = torch.zeros(1, 3, vision.image_size, vision.image_size, device=device, dtype=dtype)
                for _ in range(2):  # the first run compiles, the second records the CUDA graph
                    self.generate(ids, torch.ones_like(ids), pixels, max_new_tokens=4, min_new_tokens=4)
                if self.compiled and torch.cuda.is_available():
                    torch.cuda.synchronize()
            except Exception as exc:  # never take the app down: fall back to model.generate
                self.error = exc
            finally:
                self.warm_up_seconds = time.perf_counter() - start
                self.ready.set()
                if on_done is not None:
                    on_done(self)

        if not self.compiled:
            self.ready.set()
            if on_done is not None:
                on_done(self)
            return None
        if background:
            thread = threading.Thread(target=run, daemon=True, name="fast-generation-warm-up")
            thread.start()
            return thread
        run()
        return None

    def usable(self) -> bool:
        return self.ready.is_set() and self.error is None


# ------------------------------------------------------------------------------------------------ helpers
_GENERATORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def enabled() -> bool:
    return os.environ.get(FAST_ENV, "1") != "0"


def for_model(model, batch_size: int = 1, max_cache_len: int | None = None) -> FastGreedy | None:
    """The model's FastGreedy for this batch size and cache length (made once), or None when the fast path does
    not apply (no CUDA, a peft or 4-bit model, or MMPHI_FAST_GENERATION=0)."""
    if not enabled() or not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
        return None
    if not supports(model)[0]:
        return None
    per_model = _GENERATORS.setdefault(model, {})
    key = (batch_size, max_cache_len)
    if key not in per_model:
        per_model[key] = FastGreedy(model, batch_size=batch_size, max_cache_len=max_cache_len)
    gen = per_model[key]
    return gen if gen.error is None else None


def generate_greedy(model, input_ids, attention_mask=None, pixel_values=None, max_new_tokens: int = 32,
                    eos_token_id=None, pad_token_id=None, batch_size: int | None = None, **kwargs):
    """Greedy generation through the fast path when it applies, else ``model.generate``; the same output format.
    Batches are padded to `batch_size` (default: this batch) so chunks of an evaluation share one compiled step."""
    rows, length = input_ids.shape
    gen = None
    if kwargs.get("streamer") is None or rows == 1:
        text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") \
            else model.config
        cache_len = cache_length_bucket(length + max_new_tokens, int(getattr(text, "max_position_embeddings", 2048)))
        gen = for_model(model, batch_size or rows, cache_len)
    if gen is not None:
        if not gen.ready.is_set():
            gen.warm_up()
        if gen.usable():
            try:
                return gen.generate(input_ids, attention_mask, pixel_values, max_new_tokens=max_new_tokens,
                                    eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
            except Exception as exc:  # fall back for good, with a message
                gen.error = exc
                print(f"fast generation failed ({type(exc).__name__}: {exc}); using model.generate")
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                          max_new_tokens=max_new_tokens, do_sample=False, use_cache=True, eos_token_id=eos_token_id,
                          pad_token_id=pad_token_id, **kwargs)
