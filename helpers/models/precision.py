"""The one precision policy: where every stage trains and the assistant answers, and in which dtype.

=================  ===========================================================================================
GPU with native    **bf16**: Trainer's bf16 autocast; frozen weights, the 4-bit layers' compute, the export and the
bf16 (A100, L4,    assistant in bf16; stock SDPA attention.
A10G, H100, ...)
GPU without it     **fp16** mixed precision: Trainer's fp16 autocast with a gradient scaler; frozen weights, the
(T4, V100)         4-bit layers' compute, the export and the assistant in fp16; **Phi's attention scores in fp32**
                   (:data:`FP32_ATTENTION`). Trainable weights stay fp32 (the scaler unscales fp32 gradients).
CPU                **fp32** everywhere.
=================  ===========================================================================================

Why the attention exception: Phi-2's queries and keys reach a few hundred, so their dot products exceed fp16's
largest number (65,504) wherever the scores are materialised in fp16 (Phi's eager attention, SDPA's math kernel),
and the logits become NaN (transformers PRs 28163 and 28673: Microsoft's own ``modeling_phi.py`` computed them with
autocast disabled). :func:`fp32_score_attention` runs SDPA on fp32 copies of q, k and v with autocast off and
returns fp16: every other matmul keeps the fp16 tensor cores (65 TFLOP/s on a T4 against 8.1 in fp32).

``MMPHI_PRECISION=fp16`` (or bf16 / fp32) overrides the choice, e.g. to rehearse a T4's fp16 path on another GPU.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PRECISION_ENV = "MMPHI_PRECISION"
FP32_ATTENTION = "sdpa_fp32_scores"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
AUTOCAST_DEVICES = ("cuda", "cpu")


def fp32_score_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention computed in fp32 (scores, softmax and the weighted sum), returned in the
    queries' dtype: no score can overflow fp16, whichever SDPA kernel runs."""
    dtype, device = query.dtype, query.device.type
    autocast_device = device in AUTOCAST_DEVICES  # not "meta" (the planners' models): autocast refuses it
    if dtype == torch.float32 and not (autocast_device and torch.is_autocast_enabled(device)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # fp32 inputs under autocast too (a 4-bit layer returns its input's dtype): SDPA is on autocast's fp16 list
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast(device, enabled=False) if autocast_device else contextlib.nullcontext():
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(dtype), weights


AttentionInterface.register(FP32_ATTENTION, fp32_score_attention)
AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)  # the same masks as "sdpa"


@dataclass(frozen=True)
class Precision:
    """What runs where: `name` is "bf16", "fp16" or "fp32"."""

    name: str
    device: str

    @property
    def dtype(self) -> torch.dtype:
        """Frozen weights, the 4-bit layers' compute dtype, the export and the assistant."""
        return DTYPES[self.name]

    @property
    def attention(self) -> str:
        """The attention implementation every Phi / LLaVA model is built or loaded with."""
        return FP32_ATTENTION if self.name == "fp16" else "sdpa"

    @property
    def trainer_args(self) -> dict:
        """TrainingArguments' mixed-precision flags (fp16 brings the gradient scaler)."""
        return {"bf16": self.name == "bf16", "fp16": self.name == "fp16"}

    @property
    def autocast(self) -> bool:
        return self.name != "fp32"


def native_bf16() -> bool:
    """True on GPUs with native bf16 (compute capability 8.0+). ``torch.cuda.is_bf16_supported()`` alone is also
    true on a T4, through slow emulation."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def choose(cuda: bool, bf16: bool, override: str | None = None) -> str:
    """The precision's name for a machine (pure: the tests call it with every combination)."""
    override = (override or "auto").strip().lower()
    if override not in ("auto", *DTYPES):
        raise ValueError(f"{PRECISION_ENV}={override!r}: choose auto, bf16, fp16 or fp32")
    if override != "auto":
        if override != "fp32" and not cuda:
            raise ValueError(f"{PRECISION_ENV}={override}: mixed precision needs a GPU (this machine has none)")
        return override
    return "fp32" if not cuda else "bf16" if bf16 else "fp16"


def current() -> Precision:
    """The policy on this machine (``MMPHI_PRECISION`` overrides it)."""
    cuda = torch.cuda.is_available()
    name = choose(cuda, native_bf16(), os.environ.get(PRECISION_ENV))
    return Precision(name, f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")


def device_map() -> dict:
    """``device_map`` for from_pretrained: the whole model on the device it runs on."""
    return {"": current().device}
