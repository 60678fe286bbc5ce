"""How much GPU memory a training stage needs, before renting the GPU (docs/cost_and_scale.md, section 3).

``plan_memory(profile, stage, gpu=...)`` builds the stage's model exactly as the course builds it (the same config
functions, freezing and LoRA layout as the notebooks' cells) on PyTorch's ``meta`` device: shapes and dtypes, no
memory. Parameters are counted on it; weights priced in the dtype each is stored in (4-bit nf4 as bitsandbytes stores
it, 4.127 bits per weight); trainable parameters (projector, LoRA) are fp32 with two fp32 AdamW states. Activations
are *measured*: one training forward with the course's loss runs under ``saved_tensors_hooks`` and adds up what
autograd keeps, with the GPU's mixed precision (autocast's op lists), attention kernel and, in fp16, the course's
fp32 attention scores (``precision.fp32_score_attention``) emulated on the meta tensors. The peak is the larger of two
moments (the backward's start at the loss, and the layers' backward), not their sum; a plan *fits* when it plus a
CUDA context is below the GPU's memory. ``benchmarks/memory_peaks.py`` measures real peaks next to these plans.

Notebook use: ``print_plan(plan_memory("full", "instruct", gpu="T4"))``; command line: ``scripts/plan_memory.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import types
import unittest.mock
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

from helpers.config import PROFILES, StageSpec, get_profile
from helpers.models import precision
from helpers.models.modeling import clip_vision_config, llava_config, phi_config
from helpers.models.precision import FP32_ATTENTION, choose
from helpers.train.training import _llava_of, chunked_cross_entropy_sum, loss_chunk_tokens, project_cached_features

GiB = 1024 ** 3

# Stage 03's 4-bit and LoRA layout, as notebook 03's "load-4bit" and "lora" cells write it (the planner works where
# only the package is installed, so it keeps its own copy; tests/test_memory_plan.py runs those cells and fails if
# the two differ).
SKIP_QUANTIZATION = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|dense|fc1|fc2)"


def lora_config(profile):
    from peft import LoraConfig

    return LoraConfig(r=profile.lora_r, lora_alpha=profile.lora_alpha, lora_dropout=profile.lora_dropout,
                      target_modules=LORA_TARGETS, modules_to_save=["multi_modal_projector"], bias="none",
                      task_type="CAUSAL_LM")


def _with_lora(model, profile):
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, lora_config(profile))

# -------------------------------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # what torch.cuda.get_device_properties().total_memory reports (ECC on), in GiB
    native_bf16: bool  # compute capability >= 8.0; below it bf16 is emulated: the course trains in fp16 there


GPUS = {
    "T4": GPU("NVIDIA T4 16 GB (Colab, SageMaker g4dn)", 14.75, native_bf16=False),
    "V100-16GB": GPU("NVIDIA V100 16 GB (AWS p3, GCP)", 15.78, native_bf16=False),
    "L4": GPU("NVIDIA L4 24 GB (Colab, GCP g2)", 22.05, native_bf16=True),
    "A10G": GPU("NVIDIA A10G 24 GB (AWS g5, SageMaker)", 22.05, native_bf16=True),
    "A100-40GB": GPU("NVIDIA A100 40 GB", 39.39, native_bf16=True),
    "A100-80GB": GPU("NVIDIA A100 80 GB", 79.15, native_bf16=True),
    "H100-80GB": GPU("NVIDIA H100 80 GB", 79.11, native_bf16=True),
    "H200": GPU("NVIDIA H200 141 GB", 139.8, native_bf16=True),
}
CUDA_CONTEXT_GIB = 0.5  # CUDA context + cuBLAS workspace: outside max_memory_allocated, but on the card

STAGES = {"projection": "projection", "02": "projection", "02_projection": "projection",
          "instruct": "instruct", "03": "instruct", "03_qlora_instruct": "instruct"}

# Settings of the real checkpoint that the course's architecture-only config (helpers.models.modeling.phi_config) leaves
# at PhiConfig defaults. They change no shape, but dropout keeps masks for the backward pass.
CHECKPOINT_EXTRAS = {"microsoft/phi-2": {"resid_pdrop": 0.1, "embd_pdrop": 0.0, "attention_dropout": 0.0}}

# -------------------------------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class StandInTokenizer:
    """What the config builders read from a tokenizer, without loading one (no Hub access needed).

    Phi-2's tokenizer has 50,295 tokens including its added ones; ``<|endoftext|>`` = 50256 is BOS, EOS, UNK and
    PAD; the course appends ``<image>`` as id 50295. The tiny BPE has 400 tokens with ``<|endoftext|>`` = 0 and
    ``<image>`` = 1.
    """

    n_tokens: int
    eos_token_id: int
    image_token: int

    @property
    def bos_token_id(self) -> int:
        return self.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.eos_token_id

    def __len__(self) -> int:
        return self.n_tokens

    def convert_tokens_to_ids(self, token: str) -> int:
        if token != "<image>":
            raise KeyError(f"the stand-in tokenizer only knows <image>, not {token!r}")
        return self.image_token

    @classmethod
    def for_profile(cls, profile) -> "StandInTokenizer":
        if profile.tokenizer_checkpoint:  # Phi-2's tokenizer (from the Hub or a local copy)
            return cls(n_tokens=50295 + 1, eos_token_id=50256, image_token=50295)
        return cls(n_tokens=min(400, profile.phi.vocab_size), eos_token_id=0, image_token=1)


# -------------------------------------------------------------------------------------------------- meta models


def _stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: choose 'projection' (02) or 'instruct' (03)")
    return STAGES[stage]


def _profile(profile):
    """A profile named by a string is planned at its stock settings (``config.PROFILES``): a plan "for the full
    profile" must not pick up the settings a user gave for the run at hand (e.g. ``world.*`` ones of a tiny run)."""
    if isinstance(profile, str):
        if profile.strip().lower() not in PROFILES:
            return get_profile(profile)  # raises with the known names
        return PROFILES[profile.strip().lower()]
    return profile


def meta_llava(profile, dtype: torch.dtype = torch.float32, tok=None):
    """The profile's complete LlavaForConditionalGeneration on the meta device, built with the course's own
    config functions (helpers.models.modeling.phi_config / clip_vision_config / llava_config)."""
    from transformers import LlavaForConditionalGeneration


    profile = _profile(profile)
    tok = tok or StandInTokenizer.for_profile(profile)
    lm_config = phi_config(profile.phi, tok)
    for key, value in CHECKPOINT_EXTRAS.get(profile.llm_checkpoint, {}).items():
        setattr(lm_config, key, value)
    config = llava_config(lm_config, clip_vision_config(profile.vision), tok, profile)
    config.text_config.pad_token_id = tok.pad_token_id
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return model.to(dtype)


def _llava(model):

    return _llava_of(model)


def component_parameters(model) -> dict[str, int]:
    """Parameter counts of a (possibly peft-wrapped) LLaVA by part; the LM head is counted apart from the LM."""
    counts = {"vision_tower": 0, "projector": 0, "language_model": 0, "lm_head": 0, "lora": 0}
    for name, p in model.named_parameters():
        if "lora_" in name:
            counts["lora"] += p.numel()
        elif "vision_tower" in name:
            counts["vision_tower"] += p.numel()
        elif "multi_modal_projector" in name:
            counts["projector"] += p.numel()  # includes peft's trainable copy (modules_to_save) if any
        elif "lm_head" in name:
            counts["lm_head"] += p.numel()
        else:
            counts["language_model"] += p.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes bitsandbytes allocates for one nf4-quantized weight matrix with `numel` entries."""
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)  # two 4-bit codes per byte
    code = 16 * 4  # the nf4 code book (fp32)
    if not double_quant:
        return packed + 4 * blocks + code
    # absmax quantized to uint8, its own fp32 absmax per 256 blocks, an fp32 offset and a 256-entry fp32 code
    return packed + blocks + 4 * math.ceil(blocks / 256) + 4 + 256 * 4 + code


def _quantized_linear_names(model) -> list[str]:
    """The nn.Linear modules transformers would quantize: all but the skipped ones (notebook 03)."""

    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(
                name == s or name.startswith(s + ".") for s in SKIP_QUANTIZATION):
            names.append(name)
    return names


def _nf4_like_forward(self, x):
    """bitsandbytes Linear4bit.forward: cast to the compute dtype, matmul with the (dequantized) weight, cast back."""
    out = torch.nn.functional.linear(x.to(self.weight.dtype), self.weight,
                                     None if self.bias is None else self.bias.to(self.weight.dtype))
    return out.to(x.dtype)


def stage_model(profile, stage: str, compute_dtype: torch.dtype, load_in_4bit: bool = True, lora_r: int | None = None):
    """The model a stage trains, on the meta device, with the stage's dtypes and trainable parameters.

    Returns (model, quantized_names): `quantized_names` are the parameters stored as nf4.
    """
    return _build_stage_model(_profile(profile), _stage(stage), compute_dtype, load_in_4bit, lora_r)


def model_key(profile):
    """The profile reduced to what shapes the stages' models (hashable; a cache key)."""

    profile = _profile(profile)
    unit = StageSpec(learning_rate=1.0, batch_size=1)
    return profile.replace(pretrain=unit, clip=unit, projection=unit, instruct=unit, n_train_samples=None,
                           gradient_checkpointing=False, seed=0, n_eval_samples=0, max_new_tokens=0,
                           projector_learning_rate=0.0, world=None)


@functools.lru_cache(maxsize=16)
def _stage_model(profile, stage: str, compute_dtype: torch.dtype, load_in_4bit: bool, lora_r: int | None):
    """stage_model built once per setting for the plans (meta models hold no memory); shared, never modified."""
    return _build_stage_model(profile, stage, compute_dtype, load_in_4bit, lora_r)


def attention_for(compute_dtype: torch.dtype) -> str:
    """The attention implementation the course builds its models with when it trains in `compute_dtype`
    (``helpers.models.precision.Precision.attention``: the fp32-score attention in fp16, stock SDPA otherwise)."""

    name = {dtype: name for name, dtype in precision.DTYPES.items()}[compute_dtype]
    return precision.Precision(name, "meta").attention


def _build_stage_model(profile, stage: str, compute_dtype: torch.dtype, load_in_4bit: bool, lora_r: int | None):
    profile = _profile(profile)
    stage = _stage(stage)
    if stage == "projection":
        # notebook 02's "llava" and "freeze" cells: LLM in the precision's dtype, CLIP tower and projector fp32
        model = meta_llava(profile, compute_dtype)
        model.set_attn_implementation(attention_for(compute_dtype))
        model.model.vision_tower.float()
        model.model.multi_modal_projector.float()
        model.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(True)
        return model, set()
    # stage 03 (notebook 03): 4-bit LLM linears, everything else upcast to fp32 by
    # prepare_model_for_kbit_training, LoRA adapters (fp32) + a trainable fp32 copy of the projector

    if lora_r is not None:
        profile = profile.replace(lora_r=lora_r, lora_alpha=2 * lora_r)
    model = meta_llava(profile, compute_dtype)
    model.set_attn_implementation(attention_for(compute_dtype))  # as notebook 03 loads it
    quantized = set(_quantized_linear_names(model))
    with torch.device("meta"), _quiet():
        model = _with_lora(model, profile)
    quantized_params = set()
    for name, module in model.named_modules():
        base = name.replace("base_model.model.", "", 1).removesuffix(".base_layer")
        if base in quantized and isinstance(module, torch.nn.Linear) and not hasattr(module, "base_layer"):
            if load_in_4bit:
                module.weight.data = module.weight.data.to(compute_dtype)  # dequantized on the fly
                module.forward = types.MethodType(_nf4_like_forward, module)
                quantized_params.add(f"{name}.weight")
    if not load_in_4bit:  # plain LoRA on a bf16 LLM (for comparison): frozen LLM weights in the compute dtype
        for name, p in model.named_parameters():
            if not p.requires_grad and "vision_tower" not in name and "multi_modal_projector" not in name:
                p.data = p.data.to(compute_dtype)
    return model, quantized_params


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -------------------------------------------------------------------------------- emulated GPU semantics on meta

# PyTorch's CUDA autocast lists (torch.amp docs, "CUDA Ops that can autocast to float16 / to float32")
_AUTOCAST_LOWER = {"linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "addmv", "addr", "baddbmm",
                   "addbmm", "mv", "chain_matmul", "multi_dot", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
                   "conv_transpose2d", "conv_transpose3d", "prelu", "scaled_dot_product_attention"}
_AUTOCAST_FP32 = {"__pow__", "__rpow__", "__rdiv__", "__rtruediv__", "pow", "acos", "asin", "cosh", "sinh", "tan",
                  "erfinv", "exp", "expm1", "log", "log10", "log1p", "log2", "reciprocal", "rsqrt", "softplus",
                  "layer_norm", "group_norm", "norm", "normalize", "cosine_similarity", "softmax", "softmin",
                  "log_softmax", "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "kl_div",
                  "binary_cross_entropy_with_logits", "cumprod", "cumsum", "dist", "pdist", "cdist", "prod", "sum",
                  "renorm"}


def _cast_floats(obj, frm: tuple, to: torch.dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(to) if obj.dtype in frm else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast_floats(o, frm, to) for o in obj)
    return obj


class _CudaSemantics(TorchFunctionMode):
    """Emulates, on meta tensors, what changes memory on a GPU: autocast casts and the SDPA kernel choice.

    ``autocast_enabled`` is False inside ``torch.autocast("meta", enabled=False)`` (see :func:`_meta_autocast`): the
    region where ``helpers.models.precision.fp32_score_attention`` runs SDPA on fp32 copies, as CUDA autocast would
    leave it. ``fp32_attention`` (a model built with that attention): SDPA is never autocast, whatever dtype q, k, v
    arrive in. That is the policy's promise (attention in fp32); the function itself keeps it for half-precision
    inputs only: in stage 03 the 4-bit layers return fp32 (their input's dtype, after the fp32 layer norm), and for
    fp32 inputs it calls stock SDPA with autocast on, which runs it in fp16. The plan holds the fp32 attention the
    policy promises (more memory and time than fp16 SDPA: the safe side)."""

    def __init__(self, autocast_dtype: torch.dtype | None, attention: str, fp32_attention: bool = False):
        super().__init__()
        self.autocast_dtype, self.attention, self.fp32_attention = autocast_dtype, attention, fp32_attention
        self.autocast_enabled = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.fp32_attention and name == "scaled_dot_product_attention":
            pass  # never autocast (see the class docstring)
        elif self.autocast_dtype is not None and self.autocast_enabled:
            if name in _AUTOCAST_LOWER:
                args = _cast_floats(args, (torch.float32,), self.autocast_dtype)
                kwargs = {k: _cast_floats(v, (torch.float32,), self.autocast_dtype) for k, v in kwargs.items()}
            elif name in _AUTOCAST_FP32:
                args = _cast_floats(args, (torch.float16, torch.bfloat16), torch.float32)
                kwargs = {k: _cast_floats(v, (torch.float16, torch.bfloat16), torch.float32) for k, v in kwargs.items()}
        if name == "scaled_dot_product_attention" and self.attention == "efficient":
            return _efficient_attention(*args, **kwargs)
        if name == "dropout":
            return _cuda_dropout(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _meta_autocast(semantics: _CudaSemantics):
    """Within it ``torch.autocast("meta", enabled=False)`` (which PyTorch rejects: meta has no autocast) switches
    the emulated autocast of `semantics` off for its block, as ``torch.autocast("cuda", enabled=False)`` does on a
    GPU; ``enabled=True`` leaves the emulation as it is. Other devices get the real torch.autocast. Only code that
    names the device itself is affected (the course's fp32 attention: ``query.device.type``); transformers'
    ``maybe_autocast`` skips meta on its own."""
    real = torch.autocast

    class _Autocast:
        def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
            self.meta, self.enabled = device_type == "meta", enabled
            self.inner = None if self.meta else real(device_type, dtype=dtype, enabled=enabled,
                                                     cache_enabled=cache_enabled)

        def __enter__(self):
            if not self.meta:
                return self.inner.__enter__()
            self.saved = semantics.autocast_enabled
            semantics.autocast_enabled = self.saved and self.enabled
            return self

        def __exit__(self, *exc):
            if not self.meta:
                return self.inner.__exit__(*exc)
            semantics.autocast_enabled = self.saved
            return False

    with unittest.mock.patch.object(torch, "autocast", _Autocast):
        yield


class _DropoutWithBoolMask(torch.autograd.Function):
    """CUDA's native_dropout keeps a bool mask (1 byte per element); the meta kernel would keep one in the input
    dtype. The forward and backward are each one elementwise kernel (what helpers.planning.time_plan counts)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(torch.empty(x.shape, dtype=torch.bool, device=x.device))
        return x.mul(1.0)

    @staticmethod
    def backward(ctx, grad):
        return grad.mul(1.0)


def _cuda_dropout(input, p=0.5, training=True, inplace=False):
    if not training or p == 0:
        return input
    return _DropoutWithBoolMask.apply(input)


def _efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """Memory-efficient SDPA (what CUDA runs for masked batches). Training batches are right-padded, so a
    batch x 1 x T x T additive bias in the query dtype (what SDPA makes of the boolean mask) is kept as well."""
    b, _h, t, _d = query.shape
    bias = torch.empty(b, 1, t, key.shape[-2], dtype=query.dtype, device=query.device)
    bias = bias.expand(b, query.shape[1], t, key.shape[-2])
    out = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, dropout_p, False,
                                                                scale=scale)
    return out[0]


@dataclass
class ActivationProfile:
    outside_layers: int = 0  # embeddings, projector, final norm, what the loss keeps
    per_layer: list[int] = field(default_factory=list)
    layer_input: int = 0  # one decoder layer's input hidden state (what checkpointing keeps)
    logits: int = 0  # the lm_head output
    largest_in_layer: int = 0  # the largest single tensor a decoder layer keeps
    loss_transient: int = 0  # what exists only while the loss is differentiated (see loss_backward_transient)

    @property
    def without_checkpointing(self) -> int:
        return self.outside_layers + sum(self.per_layer)

    @property
    def with_checkpointing(self) -> int:
        return self.outside_layers + len(self.per_layer) * self.layer_input + max(self.per_layer, default=0)


LOSSES = ("answer", "model")  # the course's answer-only chunked loss; the model's own loss over full logits


def loss_backward_transient(loss: str, batch_size: int, seq_length: int, vocab: int, n_targets: int) -> int:
    """Bytes that exist only while the loss is differentiated, on top of what the forward saved.

    * ``"model"`` (transformers' ForCausalLMLoss over all B x T positions): log-softmax saved its fp32 output in the
      forward (counted with the activations); its backward holds the incoming fp32 gradient and produces another fp32
      B x T x vocab tensor: 2 x 4 bytes per logit;
    * ``"answer"`` (``helpers.train.training.answer_only_loss``): one chunk of at most ``loss_chunk_tokens`` target rows
    is
      recomputed (bf16 logits freed after their fp32 copy) and differentiated: its saved fp32 log-softmax, the incoming
      and the outgoing fp32 gradient: 3 x 4 bytes per logit of one chunk.
    """

    if loss == "model":
        return 2 * 4 * batch_size * seq_length * vocab
    chunk = min(loss_chunk_tokens(vocab), max(1, n_targets))
    return 3 * 4 * chunk * vocab


class _KeepLastHidden:
    def __init__(self, module):
        self.hidden = None
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def training_loss(model, batch_size: int, seq_length: int, autocast_dtype: torch.dtype | None = None,
                  attention: str = "efficient", image_seq_length: int | None = None, loss: str = "model",
                  answer_fraction: float = 1.0, chunk_tokens: int | None = None,
                  recompute_loss: bool = True) -> torch.Tensor:
    """One training forward with its loss, as the course runs it, on a meta (or real) LLaVA: `batch_size` rows of
    `seq_length` tokens starting with the image placeholders, vision features through the projector
    (``helpers.train.training.project_cached_features``), autocast in `autocast_dtype` (bf16 or fp16; None = fp32) and
    the SDPA kernel emulated on meta. The model's own attention implementation runs (the course's fp32-score attention
    in an fp16 stage model, see :func:`attention_for`).

    ``loss="model"``: the model's own loss (labels = input ids, full logits). ``loss="answer"``: the answer-only
    chunked loss of ``helpers.train.training.answer_only_loss``, with ``answer_fraction`` of the positions as targets
    (meta tensors cannot be indexed by a data-dependent mask, so the gather is emulated with the same cost)."""

    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}")
    llava = _llava(model)
    config = llava.config
    n_img = image_seq_length or config.image_seq_length
    if seq_length <= n_img:
        raise ValueError(f"seq_length {seq_length} must exceed the {n_img} image tokens")
    original_mask = llava.model.get_placeholder_mask
    # LlavaModel checks placeholder and feature counts with .item(), impossible on meta: same mask, no check
    llava.model.get_placeholder_mask = types.MethodType(
        lambda self, input_ids, inputs_embeds, image_features:
        (input_ids == self.config.image_token_id).unsqueeze(-1).expand_as(inputs_embeds), llava.model)
    keep = _KeepLastHidden(llava.model.language_model) if loss == "answer" else None
    try:
        device = next(model.parameters()).device
        with torch.device(device):
            ids = torch.zeros(batch_size, seq_length, dtype=torch.long)
            ids[:, :n_img] = config.image_token_id
            features = torch.zeros(batch_size, n_img, config.vision_config.hidden_size)
        # without an attention mask transformers looks for packed sequences in the position ids (.item() again)
        no_packing = unittest.mock.patch("transformers.masking_utils.find_packed_sequence_indices",
                                         lambda position_ids: None)

        semantics = _CudaSemantics(autocast_dtype, attention,
                                   fp32_attention=config.text_config._attn_implementation == FP32_ATTENTION)
        with no_packing, semantics, _meta_autocast(semantics):
            mm = project_cached_features(model, features)
            if loss == "model":
                out = model(input_ids=ids, labels=ids, mm_encoder_outputs=mm, use_cache=False)
                if out.loss is None or tuple(out.logits.shape) != (batch_size, seq_length,
                                                                   config.text_config.vocab_size):
                    raise RuntimeError("the meta forward did not produce a loss and full logits")
                return out.loss
            model(input_ids=ids, mm_encoder_outputs=mm, use_cache=False, logits_to_keep=1)
            hidden = keep.hidden
            d = hidden.shape[-1]
            n = max(1, round(answer_fraction * batch_size * (seq_length - 1)))
            rows = torch.arange(n, device=device)
            targets = torch.zeros(n, dtype=torch.long, device=device)
            picked = hidden[:, :-1].reshape(-1, d).index_select(0, rows)  # stands for hidden[:, :-1][mask]
            return chunked_cross_entropy_sum(llava.lm_head, picked, targets, chunk_tokens, recompute_loss) / n
    finally:
        llava.model.get_placeholder_mask = original_mask
        if keep is not None:
            keep.handle.remove()


def measure_activations(model, batch_size: int, seq_length: int, autocast_dtype: torch.dtype | None = None,
                        attention: str = "efficient", image_seq_length: int | None = None,
                        trace: list | None = None, loss: str = "model",
                        answer_fraction: float = 1.0) -> ActivationProfile:
    """Bytes autograd saves for the backward pass in one training forward (with loss) of a LLaVA model: a meta
    one (no memory, any size) or a real one (a test checks that both give the same count).

    The forward is :func:`training_loss` (`loss` and `answer_fraction` as there). `trace`, if given, receives
    (layer or None, shape, dtype, bytes) for every tensor counted.
    """
    llava = _llava(model)
    layers = llava.model.language_model.layers
    prof = ActivationProfile(per_layer=[0] * len(layers))
    params = {id(p) for p in model.parameters()}
    seen: dict[int, torch.Tensor] = {}
    state = {"layer": None}

    def pack(t):
        base = t if t._base is None else t._base
        if id(base) not in params and id(base) not in seen and id(t) not in params:
            seen[id(base)] = base  # keep it alive so its id is not reused
            nbytes = base.numel() * base.element_size()
            if trace is not None:
                trace.append((state["layer"], tuple(base.shape), base.dtype, nbytes))
            if state["layer"] is None:
                prof.outside_layers += nbytes
            else:
                prof.per_layer[state["layer"]] += nbytes
                prof.largest_in_layer = max(prof.largest_in_layer, nbytes)
        return t

    def pre(i):
        def hook(module, args, kwargs):
            state["layer"] = i
            hidden = args[0] if args else kwargs["hidden_states"]
            prof.layer_input = hidden.numel() * hidden.element_size()
        return hook

    def post(module, args, output):
        state["layer"] = None

    def on_logits(module, args, output):
        prof.logits = max(prof.logits, output.numel() * output.element_size())

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(post) for layer in layers]
    handles.append(llava.lm_head.register_forward_hook(on_logits))
    try:
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            training_loss(model, batch_size, seq_length, autocast_dtype, attention, image_seq_length, loss,
                          answer_fraction)
    finally:
        for h in handles:
            h.remove()
    vocab = llava.config.text_config.vocab_size
    n_targets = max(1, round(answer_fraction * batch_size * (seq_length - 1)))
    prof.loss_transient = loss_backward_transient(loss, batch_size, seq_length, vocab, n_targets)
    return prof


@functools.lru_cache(maxsize=256)
def _measured(key, stage, compute_dtype, load_in_4bit, lora_r, batch_size, seq_length, autocast, attention, loss,
              answer_fraction) -> ActivationProfile:
    model, _ = _stage_model(key, stage, compute_dtype, load_in_4bit, lora_r)
    return measure_activations(model, batch_size, seq_length, compute_dtype if autocast else None, attention,
                               key.image_seq_length, loss=loss, answer_fraction=answer_fraction)


def planned_activations(profile, stage, compute_dtype, load_in_4bit, lora_r, batch_size, seq_length, autocast,
                        attention, loss, answer_fraction) -> ActivationProfile:
    """measure_activations for a plan, cached; batches above 2 rows are extrapolated from batches of 1 and 2 (every
    saved tensor is either per row or fixed, so each count is affine in the batch; the loss transient is computed
    for the real batch)."""
    key = model_key(profile)
    args = (key, _stage(stage), compute_dtype, load_in_4bit, lora_r)
    tail = (seq_length, autocast, attention, loss, answer_fraction)
    if batch_size <= 2:
        return _measured(*args, batch_size, *tail)
    one, two = _measured(*args, 1, *tail), _measured(*args, 2, *tail)
    k = batch_size - 1

    def affine(a, b):
        return a + k * (b - a)

    prof = ActivationProfile(outside_layers=affine(one.outside_layers, two.outside_layers),
                             per_layer=[affine(a, b) for a, b in zip(one.per_layer, two.per_layer)],
                             layer_input=affine(one.layer_input, two.layer_input),
                             logits=affine(one.logits, two.logits),
                             largest_in_layer=affine(one.largest_in_layer, two.largest_in_layer))
    vocab = _stage_model(*args)[0].config.text_config.vocab_size
    n_targets = max(1, round(answer_fraction * batch_size * (seq_length - 1)))
    prof.loss_transient = loss_backward_transient(loss, batch_size, seq_length, vocab, n_targets)
    return prof


# ------------------------------------------------------------------------------------------------------ the plan


@dataclass
class MemoryPlan:
    profile: str
    stage: str
    gpu: str
    gpu_gib: float
    batch_size: int
    seq_length: int
    gradient_checkpointing: bool
    precision: str  # "bf16 autocast", "fp16 autocast" (attention in fp32) or "fp32"
    attention: str  # "efficient" or "math"
    load_in_4bit: bool
    parameters: dict[str, int]
    weight_bytes: dict[str, int]  # by part, as stored
    gradient_bytes: int
    optimizer_bytes: int
    master_weight_bytes: int
    activation_bytes_without_checkpointing: int
    activation_bytes_with_checkpointing: int
    logits_transient_bytes: int  # what exists only while the loss is differentiated (see loss_backward_transient)
    cuda_context_bytes: int
    assumptions: list[str] = field(default_factory=list)
    grad_accum: int = 1
    loss: str = "answer"
    outside_bytes: int = 0  # activations outside the decoder layers (embeddings, projector, final norm, the loss)
    layer_input_bytes: int = 0
    layer_sum_bytes: int = 0
    layer_max_bytes: int = 0
    layer_transient_bytes: int = 0  # gradients in flight inside one layer's backward: 2 x its largest tensor
    n_layers: int = 0
    workspace_bytes: int = 0  # cuBLAS / cuBLASLt workspaces (allocated through PyTorch's allocator)
    measured_extra_bytes: int = 0  # what the GPU measurements showed beyond the count (MEASURED_EXTRA_GIB)
    margin: float = 0.0  # relative allowance on the step's activations (allocator rounding, unseen small tensors)

    @property
    def weights_total(self) -> int:
        return sum(self.weight_bytes.values())

    @property
    def activation_bytes(self) -> int:
        return (self.activation_bytes_with_checkpointing if self.gradient_checkpointing
                else self.activation_bytes_without_checkpointing)

    @property
    def kept_layer_bytes(self) -> int:
        """What the decoder layers keep until the backward pass reaches them."""
        return self.n_layers * self.layer_input_bytes if self.gradient_checkpointing else self.layer_sum_bytes

    @property
    def gradients_persist(self) -> bool:
        """With gradient accumulation the gradients of earlier micro-batches stay during the next forward."""
        return self.grad_accum > 1

    @property
    def persistent_bytes(self) -> int:
        """Alive through the whole step: weights, AdamW states (from the first optimizer step on), master copies,
        workspaces and, with gradient accumulation, the gradients."""
        return (self.weights_total + self.optimizer_bytes + self.master_weight_bytes + self.workspace_bytes
                + self.measured_extra_bytes + (self.gradient_bytes if self.gradients_persist else 0))

    @property
    def loss_phase_bytes(self) -> int:
        """Peak candidate 1, the end of the forward / start of the backward: every kept activation plus the loss's
        backward transient (the full logits' gradients for the model's own loss)."""
        return self.kept_layer_bytes + self.outside_bytes + self.logits_transient_bytes

    @property
    def layer_phase_bytes(self) -> int:
        """Peak candidate 2, the backward through the decoder layers (the loss's tensors are gone by then). With
        checkpointing one layer is recomputed at a time while the kept inputs of the layers below it are alive;
        without gradient accumulation the gradients appear layer by layer as the kept inputs are released, so the
        worse end of that trade is taken."""
        grads = 0 if self.gradients_persist else self.gradient_bytes
        layers = max(self.n_layers, 1)
        if self.gradient_checkpointing:
            kept_and_grads = max(self.n_layers * self.layer_input_bytes + grads // layers,
                                 self.layer_input_bytes + grads)
            return kept_and_grads + self.layer_max_bytes + self.layer_transient_bytes
        return self.layer_sum_bytes + grads // layers + self.layer_transient_bytes

    @property
    def peak_phase(self) -> str:
        return "loss" if self.loss_phase_bytes >= self.layer_phase_bytes else "layers"

    @property
    def step_bytes(self) -> int:
        """The step's own peak on top of the persistent memory, with the margin."""
        return int(max(self.loss_phase_bytes, self.layer_phase_bytes) * (1 + self.margin))

    @property
    def total_bytes(self) -> int:
        """Estimated peak of torch.cuda.max_memory_allocated() during a training step."""
        return self.persistent_bytes + self.step_bytes

    @property
    def needed_bytes(self) -> int:
        return self.total_bytes + self.cuda_context_bytes

    @property
    def headroom_bytes(self) -> int:
        return int(self.gpu_gib * GiB) - self.needed_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(weights_total=self.weights_total, activation_bytes=self.activation_bytes,
                 kept_layer_bytes=self.kept_layer_bytes, persistent_bytes=self.persistent_bytes,
                 loss_phase_bytes=self.loss_phase_bytes, layer_phase_bytes=self.layer_phase_bytes,
                 peak_phase=self.peak_phase, total_bytes=self.total_bytes, needed_bytes=self.needed_bytes,
                 headroom_bytes=self.headroom_bytes, fits=self.fits)
        return d


CUBLAS_WORKSPACE_GIB = 1 / 16  # cuBLAS + cuBLASLt workspaces of one stream (up to 32 MiB each on Hopper)
ACTIVATION_MARGIN = 0.05  # tensors the saved-tensor count does not see (an allowance, not a measured figure)
# Measured on an H200 (benchmarks/results/memory_peaks_h200.json, qlora_step_h200.json) above what the count explains:
# stage 02's peaks were 0.4-1.4 GiB over the counted ones in all six configurations (16 x 83 and 16 x 512 tokens,
# with and without checkpointing, both losses), stage 03's up to 0.2 GiB (the old way on real LLaVA lengths). The
# source is not identified; these allowances keep every measured peak at or below the plan (within 10 %).
MEASURED_EXTRA_GIB = {"projection": 1.45, "instruct": 0.25}


def gpu_by_name(table: dict, gpu, problem: str = "unknown GPU"):
    """`table[gpu]` with the name matched loosely ("a100 80gb" finds "A100-80GB"), or a ValueError listing the
    names there are."""
    key = {k.lower(): k for k in table}.get(str(gpu).lower().replace(" ", "-"))
    if key is None:
        raise ValueError(f"{problem} {gpu!r}: choose one of {sorted(table)}")
    return table[key]


def _gpu(gpu) -> GPU:
    return gpu if isinstance(gpu, GPU) else gpu_by_name(GPUS, gpu)


PRECISIONS = ("bf16", "fp16", "fp32")
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def precision_for(gpu, precision: str = "auto") -> str:
    """The precision a stage trains in on `gpu`: ``"auto"`` is the course's policy (``helpers.models.precision.choose``:
    bf16 where the GPU has native bf16, fp16 otherwise); "bf16", "fp16" or "fp32" are taken as given."""
    if precision == "auto":
        return choose(cuda=True, bf16=_gpu(gpu).native_bf16)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto' or one of {PRECISIONS}, not {precision!r}")
    return precision


def plan_memory(profile="full", stage: str = "instruct", gpu="T4", batch_size: int | None = None,
                seq_length: int | None = None, gradient_checkpointing: bool | None = None,
                precision: str = "auto", load_in_4bit: bool = True, lora_r: int | None = None,
                attention: str = "auto", grad_accum: int | None = None, loss: str = "answer",
                answer_fraction: float = 1.0) -> MemoryPlan:
    """Memory needed to train `stage` ("projection" = 02, "instruct" = 03) of `profile` on `gpu`.

    Defaults are the profile's own settings: its batch size and gradient accumulation, its ``max_length`` (the
    longest batch the collator can produce), its gradient checkpointing flag and LoRA rank. ``precision="auto"`` is
    what the course does on that GPU (``helpers.models.precision.choose``): bf16 (LLM stored in bf16, Trainer's bf16
    autocast) where the GPU has native bf16; fp16 on a T4 or a V100 (frozen LLM and the 4-bit layers' compute in
    fp16, Trainer's fp16 autocast with a gradient scaler, Phi's attention in fp32 by
    ``helpers.models.precision.fp32_score_attention``, whose fp32 copies of q, k, v and fp32 output are planned).
    ``"bf16"``, ``"fp16"`` and ``"fp32"`` can be asked for on any GPU (``MMPHI_PRECISION``). No fp32 master weights in
    any of them: every trainable parameter is fp32 (the fp16 gradient scaler unscales fp32 gradients in place).
    ``attention="auto"`` picks the memory-efficient SDPA kernel (fp32 has it on every GPU), or the math kernel for
    bf16 on GPUs without native bf16 (only when bf16 is forced there). ``loss="answer"`` is the course's loss
    (``helpers.train.training.answer_only_loss``), ``"model"`` the model's own loss over full logits;
    ``answer_fraction`` is the share of positions that are answer tokens (1 = the worst case).

    The peak is the larger of two moments of a step (the measured GPU peaks of the course's stages are one or the
    other): the start of the backward pass at the loss, and the backward pass through the decoder layers. See
    :class:`MemoryPlan`.
    """
    profile = _profile(profile)
    stage_name = _stage(stage)
    spec = profile.projection if stage_name == "projection" else profile.instruct
    batch_size = batch_size or spec.batch_size
    seq_length = seq_length or spec.max_length
    grad_accum = spec.grad_accum if grad_accum is None else grad_accum
    checkpointing = profile.checkpointing(stage_name) if gradient_checkpointing is None else gradient_checkpointing
    card = _gpu(gpu)
    precision = precision_for(card, precision)
    compute_dtype = PRECISION_DTYPES[precision]
    if attention == "auto":
        attention = "math" if (precision == "bf16" and not card.native_bf16) else "efficient"

    model, quantized = _stage_model(model_key(profile), stage_name, compute_dtype, load_in_4bit, lora_r)
    counts = component_parameters(model)
    counts["quantized"] = sum(p.numel() for n, p in model.named_parameters() if n in quantized)

    weights = {"vision_tower": 0, "projector": 0, "language_model_nf4": 0, "language_model": 0, "lm_head": 0,
               "lora": 0}
    for name, p in model.named_parameters():
        part = ("lora" if "lora_" in name else "vision_tower" if "vision_tower" in name else
                "projector" if "multi_modal_projector" in name else "lm_head" if "lm_head" in name else
                "language_model")
        if name in quantized:
            weights["language_model_nf4"] += nf4_bytes(p.numel())
        elif stage_name == "instruct" and load_in_4bit and p.dtype in (torch.float16, torch.bfloat16):
            weights[part] += p.numel() * 4  # prepare_model_for_kbit_training upcast it to fp32
        else:
            weights[part] += p.numel() * p.element_size()
    weights["buffers"] = sum(b.numel() * b.element_size() for b in model.buffers())

    trainable = [p for p in model.parameters() if p.requires_grad]
    gradient_bytes = sum(p.numel() * 4 for p in trainable)  # fp32 trainable params -> fp32 grads
    optimizer_bytes = sum(p.numel() * 8 for p in trainable)  # AdamW: exp_avg + exp_avg_sq
    master_bytes = sum(p.numel() * 4 for p in trainable if p.dtype != torch.float32)

    acts = planned_activations(profile, stage_name, compute_dtype, load_in_4bit, lora_r, batch_size, seq_length,
                               precision != "fp32", attention, loss, answer_fraction)

    assumptions = [
        f"trainable parameters fp32; AdamW 2 fp32 states each; fp32 master copies: "
        f"{'none needed' if not master_bytes else 'yes'}",
        f"activations measured on the meta model (saved-tensor hooks), "
        f"{'no autocast' if precision == 'fp32' else precision + ' autocast'} and the SDPA kernel emulated",
        f"every row padded to seq_length={seq_length} (the worst case; length-balanced batches pad little)",
        "peak = the larger of the loss moment and the layer backward; gradients kept between micro-batches when "
        f"accumulating (grad_accum={grad_accum}); {ACTIVATION_MARGIN:.0%} allowance on the step's activations",
        f"loss: {'answer positions only, logits a chunk at a time' if loss == 'answer' else 'full logits'}",
        f"CUDA context {CUDA_CONTEXT_GIB} GiB on the card; cuBLAS workspaces {CUBLAS_WORKSPACE_GIB:.3f} GiB "
        "inside the peak; allocator fragmentation not included",
        f"+{MEASURED_EXTRA_GIB[stage_name]} GiB measured on an H200 beyond what the count explains (source not "
        "identified; helpers.planning.memory_plan.MEASURED_EXTRA_GIB)",
    ]
    if stage_name == "instruct" and load_in_4bit:
        assumptions.insert(0, "nf4, blocksize 64, double quantization: 4.127 bits per quantized weight; other "
                              "parameters fp32 after peft.prepare_model_for_kbit_training")
    if precision == "bf16" and not card.native_bf16:
        assumptions.append(f"{card.name}: bf16 is emulated (no bf16 tensor cores) and SDPA uses the math kernel")
    if precision == "fp16":
        assumptions.append("fp16: Phi's attention runs in fp32 (helpers.models.precision.fp32_score_attention): "
                           "its fp32 copies of q, k, v, fp32 output and bias are kept for the backward; the gradient "
                           "scaler "
                           "unscales the fp32 gradients in place (no master weights)")
    return MemoryPlan(profile=profile.name, stage=stage_name, gpu=card.name, gpu_gib=card.memory_gib,
                      batch_size=batch_size, seq_length=seq_length, gradient_checkpointing=checkpointing,
                      precision="fp32" if precision == "fp32" else f"{precision} autocast", attention=attention,
                      load_in_4bit=stage_name == "instruct" and load_in_4bit, parameters=counts,
                      weight_bytes=weights, gradient_bytes=gradient_bytes, optimizer_bytes=optimizer_bytes,
                      master_weight_bytes=master_bytes,
                      activation_bytes_without_checkpointing=acts.without_checkpointing,
                      activation_bytes_with_checkpointing=acts.with_checkpointing,
                      logits_transient_bytes=acts.loss_transient, cuda_context_bytes=int(CUDA_CONTEXT_GIB * GiB),
                      assumptions=assumptions, grad_accum=grad_accum, loss=loss, outside_bytes=acts.outside_layers,
                      layer_input_bytes=acts.layer_input, layer_sum_bytes=sum(acts.per_layer),
                      layer_max_bytes=max(acts.per_layer, default=0),
                      layer_transient_bytes=2 * acts.largest_in_layer, n_layers=len(acts.per_layer),
                      workspace_bytes=int(CUBLAS_WORKSPACE_GIB * GiB),
                      measured_extra_bytes=int(MEASURED_EXTRA_GIB[stage_name] * GiB), margin=ACTIVATION_MARGIN)


# ------------------------------------------------------------------------------------------------------ display


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f} GiB"


def format_plan(plan: MemoryPlan) -> str:
    p = plan.parameters
    lines = [
        f"Memory plan: profile {plan.profile}, stage {plan.stage}, {plan.gpu} ({plan.gpu_gib:.2f} GiB)",
        f"  batch {plan.batch_size} x {plan.seq_length} tokens (x {plan.grad_accum} accumulated), {plan.precision}, "
        f"attention {plan.attention}, gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}"
        + (", LLM in 4-bit nf4" if plan.load_in_4bit else ""),
        f"  parameters: {p['total']:,} total, {p['trainable']:,} trainable "
        f"(vision {p['vision_tower']:,}, projector {p['projector']:,}, LLM {p['language_model']:,}, "
        f"lm_head {p['lm_head']:,}, LoRA {p['lora']:,}; {p['quantized']:,} in 4-bit)",
        "  " + "-" * 58,
    ]
    for part, n in plan.weight_bytes.items():
        if n:
            lines.append(f"  weights: {part:<36}{_gib(n)}")
    act_note = "with" if plan.gradient_checkpointing else "without"
    grads_note = "kept between micro-batches" if plan.gradients_persist else "built during the backward"
    rows = [(f"gradients (fp32, {grads_note})", plan.gradient_bytes),
            ("AdamW states (2 x fp32)", plan.optimizer_bytes),
            ("fp32 master weights", plan.master_weight_bytes), ("cuBLAS workspaces", plan.workspace_bytes),
            ("measured beyond the count (H200)", plan.measured_extra_bytes),
            (f"kept by the layers ({act_note} checkpointing)", plan.kept_layer_bytes),
            ("kept outside the layers (embeddings, loss)", plan.outside_bytes),
            ("loss backward transient" + (" (full logits)" if plan.loss == "model" else " (one chunk)"),
             plan.logits_transient_bytes),
            ("one layer recomputed + its gradients" if plan.gradient_checkpointing else "one layer's gradients",
             (plan.layer_max_bytes if plan.gradient_checkpointing else 0) + plan.layer_transient_bytes)]
    lines += [f"  {name:<45}{_gib(n)}" for name, n in rows]
    lines += [
        "  " + "-" * 58,
        f"  {'peak at the loss (start of the backward)':<45}{_gib(plan.persistent_bytes + plan.loss_phase_bytes)}",
        f"  {'peak in the layers backward':<45}{_gib(plan.persistent_bytes + plan.layer_phase_bytes)}",
        f"  {'estimated peak allocated (+' + format(plan.margin, '.0%') + ' margin)':<45}{_gib(plan.total_bytes)}",
        f"  {'+ CUDA context':<45}{_gib(plan.cuda_context_bytes)}",
        f"  {'needed':<45}{_gib(plan.needed_bytes)}",
        f"  activations would be {plan.activation_bytes_without_checkpointing / GiB:.2f} GiB without and "
        f"{plan.activation_bytes_with_checkpointing / GiB:.2f} GiB with gradient checkpointing",
        f"  => {'FITS' if plan.fits else 'DOES NOT FIT'} on {plan.gpu}: "
        f"{abs(plan.headroom_bytes) / GiB:.2f} GiB {'to spare' if plan.fits else 'short'}",
    ]
    lines += [f"  assumption: {a}" for a in plan.assumptions]
    return "\n".join(lines)


def print_plan(plan: MemoryPlan) -> MemoryPlan:
    print(format_plan(plan))
    return plan


def show(profile="full", stage: str = "instruct", gpu="T4", **kwargs) -> MemoryPlan:
    """Plan and print in one call (notebooks): ``show("full", "projection", gpu="T4")``."""
    return print_plan(plan_memory(profile, stage, gpu=gpu, **kwargs))
