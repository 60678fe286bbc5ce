"""How long a training stage takes on a given GPU, before renting it (docs/cost_and_scale.md, section 5).

``plan_time(profile, stage, gpu=...)`` runs one training micro-step of the stage's meta model (the memory plan's, in
the precision the course trains in on that GPU, ``helpers.models.precision``) under a ``TorchDispatchMode`` that
sees every kernel PyTorch would launch, with its FLOPs (``torch.utils.flop_counter``) and bytes; bitsandbytes'
dequantization of each 4-bit weight before each use is added. Each kernel is priced by a roofline (FLOPs at the
dtype's peak, bytes at the bandwidth, at efficiencies calibrated on H200 step times: ``CALIBRATION_POINTS``), and a
step takes the longer of the GPU's sum and the host's cost of issuing the kernels. Padding is simulated on the data's
length distribution (the real one, or an assumed one that the plan prints). Every GPU but the H200 is *assumed* to
reach the same fractions of its own peaks.

``recipe_for_gpu(profile, gpu)`` / ``fit_to_gpu(profile)`` choose each stage's micro-batch, accumulation (same
effective batch), checkpointing (only when memory needs it) and amount of data so that a stage fits a time budget
(2 h by default), with a sentence saying why; ``eta_callback`` shows planned and measured seconds per step and the ETA.

Notebook use: ``time_plan.show("full", "instruct", gpu="T4")`` (memory + time plan); ``print(time_plan.time_table(
"full"))`` (every stage on every GPU).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from helpers.planning import memory_plan as mp

GiB = mp.GiB

# ------------------------------------------------------------------------------------------------------ hardware


@dataclass(frozen=True)
class GPUSpec:
    """Published peaks of one GPU (dense, no sparsity)."""

    key: str  # helpers.planning.memory_plan.GPUS key (memory, bf16 support)
    bf16_tflops: float  # what a bf16 matmul can reach: tensor cores, or the fp32 rate where bf16 is emulated (T4)
    fp32_tflops: float  # fp32 matmuls (PyTorch does not use TF32 for matmuls by default)
    bandwidth_gbs: float  # memory bandwidth, GB/s
    host_factor: float = 1.0  # host CPU time per kernel relative to the calibration machine (assumed)
    note: str = ""
    fp16_tflops: float | None = None  # fp16 tensor cores; None = the bf16 rate (the same units on Ampere and later)

    @property
    def memory(self) -> mp.GPU:
        return mp.GPUS[self.key]

    @property
    def matmul_tflops(self) -> dict:
        """Matmul peak by operand dtype."""
        return {torch.bfloat16: self.bf16_tflops, torch.float16: self.fp16_tflops or self.bf16_tflops,
                torch.float32: self.fp32_tflops}

    def peak_tflops(self, precision: str) -> float:
        """The matmul peak of a precision ("bf16", "fp16", "fp32")."""
        return self.matmul_tflops[mp.PRECISION_DTYPES[precision]]


GPU_SPECS = {
    "T4": GPUSpec("T4", 8.1, 8.1, 320, 1.5, "no bf16 tensor cores: the course trains in fp16 there (65 TFLOP/s "
                  "tensor cores) with Phi's attention in fp32 (8.1 TFLOP/s); Colab host CPU", fp16_tflops=65),
    "V100-16GB": GPUSpec("V100-16GB", 15.7, 15.7, 900, 1.5, "no bf16 tensor cores: the course trains in fp16 "
                         "there (125 TFLOP/s tensor cores) with Phi's attention in fp32 (15.7 TFLOP/s); older cloud "
                         "host CPU (assumed like Colab's)", fp16_tflops=125),
    "L4": GPUSpec("L4", 121, 30.3, 300, 1.5, "Colab host CPU"),
    "A10G": GPUSpec("A10G", 70, 35, 600, 1.2),
    "A100-40GB": GPUSpec("A100-40GB", 312, 19.5, 1555),
    "A100-80GB": GPUSpec("A100-80GB", 312, 19.5, 2039),
    "H100-80GB": GPUSpec("H100-80GB", 989, 67, 3350),
    "H200": GPUSpec("H200", 989, 67, 4800),
}
TABLE_GPUS = ["T4", "V100-16GB", "L4", "A10G", "A100-80GB", "H100-80GB", "H200"]


def detect_gpu() -> str | None:
    """The GPU_SPECS key of the CUDA device in use, or None (no GPU, or one not in the table)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().upper()
    memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB
    for key, marker in (("H200", "H200"), ("H100-80GB", "H100"), ("A10G", "A10G"), ("L4", "L4"), ("T4", "T4")):
        if marker in name:
            return key
    if "V100" in name:
        return "V100-16GB" if memory < 20 else None  # the 32 GB V100 is not in the table
    if "A100" in name:
        return "A100-80GB" if memory > 60 else "A100-40GB"
    return None


def _spec(gpu) -> GPUSpec:
    return gpu if isinstance(gpu, GPUSpec) else mp.gpu_by_name(GPU_SPECS, gpu, "no speed figures for GPU")


# ------------------------------------------------------------------------------------------------ counting kernels

# ops that launch no kernel: views, metadata, allocations without a fill
_FREE_OPS = {"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided",
             "aten.detach", "aten.alias", "aten.lift_fresh", "aten._unsafe_view", "aten.view", "aten.t",
             "aten.transpose", "aten.permute", "aten.expand", "aten.slice", "aten.select", "aten.unsqueeze",
             "aten.squeeze", "aten.as_strided", "aten.split", "aten.split_with_sizes", "aten.unbind",
             "aten.reshape", "aten._reshape_alias", "aten.unflatten", "aten.chunk", "aten.narrow", "aten.diagonal",
             "aten.sym_size", "aten.sym_stride", "aten.sym_numel", "aten.is_same_size", "aten.scalar_tensor",
             "aten._local_scalar_dense", "aten.set_", "aten.resize_"}


def _nbytes(t: torch.Tensor) -> int:
    n = t.numel() * t.element_size()
    try:  # an expanded tensor (stride 0) reads its storage, not its numel
        return min(n, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return n


@dataclass
class KernelCount:
    """Every kernel of one micro-step: FLOPs, bytes moved, whether it is an fp32 (or fp16) matmul, and where it
    ran."""

    flops: list = field(default_factory=list)
    nbytes: list = field(default_factory=list)
    fp32: list = field(default_factory=list)
    fp16: list = field(default_factory=list)  # fp16 operands: the fp16 tensor-core rate (bf16's otherwise)
    layer_forward: list = field(default_factory=list)  # run again by gradient checkpointing
    head_forward: list = field(default_factory=list)  # the answer-only loss's LM head: always run again

    def __len__(self):
        return len(self.flops)

    def arrays(self):
        """(flops, bytes, fp32 matmul?, in a layer's forward?, in the loss head's forward?, fp16 matmul?) as tensors
        (cached)."""
        if getattr(self, "_arrays", None) is None or len(self._arrays[0]) != len(self.flops):
            fp16 = self.fp16 if len(self.fp16) == len(self.flops) else [False] * len(self.flops)
            self._arrays = (torch.tensor(self.flops, dtype=torch.float64),
                            torch.tensor(self.nbytes, dtype=torch.float64),
                            torch.tensor(self.fp32, dtype=torch.bool),
                            torch.tensor(self.layer_forward, dtype=torch.bool),
                            torch.tensor(self.head_forward, dtype=torch.bool),
                            torch.tensor(fp16, dtype=torch.bool))
        return self._arrays

    @property
    def total_flops(self) -> float:
        return float(sum(self.flops))

    @property
    def total_bytes(self) -> float:
        return float(sum(self.nbytes))


class KernelCounter(TorchDispatchMode):
    """Records FLOPs (torch.utils.flop_counter's formulas) and bytes of every kernel-launching aten op."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.count = KernelCount()
        self.in_layer = False
        self.in_head = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        name = str(packet)
        if name in _FREE_OPS or getattr(func, "is_view", False):
            return out
        flops = self.registry[packet](*args, **kwargs, out_val=out) if packet in self.registry else 0
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        nbytes = sum(_nbytes(t) for t in tensors)
        first = next((t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)), None)
        fp32 = bool(flops) and first is not None and first.dtype == torch.float32  # the operands' dtype
        fp16 = bool(flops) and first is not None and first.dtype == torch.float16
        c = self.count
        c.flops.append(float(flops))
        c.nbytes.append(float(nbytes))
        c.fp32.append(fp32)
        c.fp16.append(fp16)
        c.layer_forward.append(self.in_layer and torch.is_grad_enabled())
        c.head_forward.append(self.in_head and torch.is_grad_enabled())
        return out


@dataclass(frozen=True)
class StepShape:
    """One micro-step as counted: what the model is and what goes through it."""

    profile: object  # a Profile reduced by _model_key, or "tiny" / "full"
    stage: str
    batch_size: int
    seq_length: int
    attention: str = "efficient"
    loss: str = "answer"
    answer_fraction: float = 1.0
    precision: str = "bf16"  # "bf16", "fp16" (attention in fp32) or "fp32"
    lora_r: int | None = None


def _profile(profile):
    return mp._profile(profile)


def _model_key(profile):
    return mp.model_key(profile)


@functools.lru_cache(maxsize=64)
def count_kernels(shape: StepShape) -> KernelCount:
    """Count the kernels of one training micro-step (forward with loss + backward) on the meta model.

    In fp16 the stage model is built, as the course builds it, with Phi's attention implementation set to
    ``helpers.models.precision.FP32_ATTENTION`` (``memory_plan.attention_for``): the course's function runs on the meta
    tensors, so its fp32 copies of q, k, v and SDPA's kernels on fp32 operands are counted as fp32 (rate and bytes).
    No kernel is tagged by hand; the emulated autocast leaves SDPA in fp32 in such a model (see
    ``memory_plan._CudaSemantics``: the policy's promise, also where q, k, v arrive in fp32)."""
    profile = _profile(shape.profile)
    dtype = mp.PRECISION_DTYPES[shape.precision]
    model, _ = mp._stage_model(mp.model_key(profile), mp._stage(shape.stage), dtype, True, shape.lora_r)
    llava = mp._llava(model)
    counter = KernelCounter()

    def enter(module, args, kwargs):
        if module is llava.lm_head:
            counter.in_head = True
        else:
            counter.in_layer = True

    def leave(module, args, output):
        counter.in_layer = counter.in_head = False

    layers = llava.model.language_model.layers
    # the layers' forward runs again under gradient checkpointing; so does the LM head of the answer-only loss
    # (helpers.train.training.chunked_cross_entropy_sum recomputes each chunk's logits in the backward pass)
    recomputed = list(layers) + ([llava.lm_head] if shape.loss == "answer" else [])
    handles = [m.register_forward_pre_hook(enter, with_kwargs=True) for m in recomputed]
    handles += [m.register_forward_hook(leave) for m in recomputed]
    try:
        model.train()
        with counter:
            loss = mp.training_loss(model, shape.batch_size, shape.seq_length,
                                    None if shape.precision == "fp32" else dtype, shape.attention,
                                    profile.image_seq_length, shape.loss, shape.answer_fraction,
                                    chunk_tokens=1 << 30,  # one chunk: the same kernels for any batch size
                                    recompute_loss=False)  # its recomputation is added from the tags
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():  # the shared meta model stays as it was
            p.grad = None
    return counter.count


def _scaled_count(shape: StepShape) -> KernelCount:
    """The count for any batch size from counts at batch 1 and 2 (every kernel's work is affine in the batch)."""
    if shape.batch_size <= 2:
        return count_kernels(shape)
    one = count_kernels(dataclasses.replace(shape, batch_size=1))
    two = count_kernels(dataclasses.replace(shape, batch_size=2))
    if len(one) != len(two):
        return count_kernels(shape)
    b = shape.batch_size - 1
    return KernelCount(flops=[f1 + b * (f2 - f1) for f1, f2 in zip(one.flops, two.flops)],
                       nbytes=[n1 + b * (n2 - n1) for n1, n2 in zip(one.nbytes, two.nbytes)],
                       fp32=list(one.fp32), fp16=list(one.fp16), layer_forward=list(one.layer_forward),
                       head_forward=list(one.head_forward))


def quantized_weights(profile, stage: str, lora_r: int | None = None) -> tuple[int, int]:
    """(number of 4-bit matrices, their weights) in the stage's model (0, 0 for stage 02)."""
    if mp._stage(stage) != "instruct":
        return 0, 0
    model, quantized = mp._stage_model(mp.model_key(profile), mp._stage(stage), torch.bfloat16, True, lora_r)
    sizes = [p.numel() for n, p in model.named_parameters() if n in quantized]
    return len(sizes), sum(sizes)


_quantized = functools.lru_cache(maxsize=16)(quantized_weights)

# --------------------------------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    matmul_efficiency: float  # fraction of the dtype's peak a matmul kernel reaches
    bandwidth_efficiency: float  # fraction of the memory bandwidth other kernels reach
    host_seconds_per_kernel: float  # host time to issue one kernel (Python, autograd, peft, bitsandbytes)
    kernel_seconds: float = 3e-6  # the shortest a kernel takes on the GPU (launch and tail)
    batch_overhead_seconds: float = 0.0  # per micro-batch of real data: new shapes, collation, host-to-device copies
    source: str = ""


# Step times measured on an H200 with the course's own code (random weights at real size, in an earlier session whose
# raw log was not kept: these five figures are the record):
# (stage, batch, tokens, gradient checkpointing, attention, loss, seconds per micro-step)
CALIBRATION_POINTS = [
    ("instruct", 4, 1024, True, "efficient", "model", 0.56),  # 0.52-0.60 s
    ("instruct", 4, 1024, True, "math", "model", 0.76),  # 0.75-0.77 s
    ("instruct", 16, 1024, True, "efficient", "model", 1.54),
    ("instruct", 8, 1024, False, "efficient", "model", 0.62),
    ("projection", 16, 83, True, "efficient", "model", 0.205),
]
CALIBRATION_GPU = "H200"

# fit_calibration(CALIBRATION_POINTS) (least squares on log time over a grid) leaves a ridge of near-equal fits from
# (matmul 0.35, bandwidth 0.90) to (0.50, 0.65), all at 50 us of host time per kernel; the middle of the ridge is
# used. It plans the five measured steps at 0.54 / 0.69 / 1.70 / 0.62 / 0.22 s (measured 0.56 / 0.76 / 1.54 /
# 0.62 / 0.205 s): within 11 %. Batch 4 with checkpointing and stage 02 are host-bound (kernel launches).
# Real LLaVA-length batches (benchmarks/results/qlora_step_h200.json: a shape per micro-batch) took 25.9 s per optimizer
# step of 32 micro-batches (old way) and 5.94 s of 8 (new way) where the fixed-shape fit plans 17.3 and 3.6 s: the same
# 0.27-0.29 s more per micro-batch in both, which the plan adds as batch_overhead_seconds (host side: scaled by the
# GPU's host_factor; measured for stage 03 only, assumed for stage 02).
CALIBRATION = Calibration(matmul_efficiency=0.45, bandwidth_efficiency=0.70, host_seconds_per_kernel=50e-6,
                          batch_overhead_seconds=0.28,
                          source="fitted to 5 step times measured on an H200 (CALIBRATION_POINTS) + 0.28 s per "
                                 "micro-batch of real data (benchmarks/results/qlora_step_h200.json)")


def _micro_seconds(count: KernelCount, spec: GPUSpec, cal: Calibration, checkpointing: bool,
                   n_dequant: int, dequant_weights: int) -> dict:
    flops, nbytes, is_fp32, in_layer, in_head, is_fp16 = count.arrays()
    rates = {dtype: tflops * 1e12 * cal.matmul_efficiency for dtype, tflops in spec.matmul_tflops.items()}
    bandwidth = spec.bandwidth_gbs * 1e9 * cal.bandwidth_efficiency
    rate = torch.where(is_fp32, rates[torch.float32],
                       torch.where(is_fp16, rates[torch.float16], rates[torch.bfloat16]))
    per_kernel = torch.maximum(flops / rate, nbytes / bandwidth).clamp(min=cal.kernel_seconds)
    gpu = float(per_kernel.sum()) + float(per_kernel[in_head].sum())
    n_kernels = len(count) + int(in_head.sum())
    if checkpointing:
        gpu += float(per_kernel[in_layer].sum())
        n_kernels += int(in_layer.sum())
    passes = 3 if checkpointing else 2  # forward, backward (input gradients), recomputed forward
    dequant = passes * n_dequant * cal.kernel_seconds + passes * dequant_weights * (0.516 + 2) / bandwidth
    gpu += dequant
    n_kernels += passes * n_dequant
    host = n_kernels * cal.host_seconds_per_kernel * spec.host_factor
    return {"gpu_s": gpu, "host_s": host, "dequant_s": dequant, "kernels": n_kernels,
            "seconds": max(gpu, host), "bound": "GPU" if gpu >= host else "host (kernel launches)"}


def micro_step_seconds(profile, stage: str, gpu, batch_size: int, seq_length: int, checkpointing: bool,
                       attention: str = "auto", loss: str = "answer", answer_fraction: float = 1.0,
                       cal: Calibration | None = None, lora_r: int | None = None, precision: str = "auto") -> dict:
    """Planned seconds of one micro-step of `batch_size` rows padded to `seq_length` tokens on `gpu`, in
    `precision` ("auto": what the course trains in there, ``memory_plan.precision_for``)."""
    spec = _spec(gpu)
    cal = cal or CALIBRATION
    precision = mp.precision_for(spec.key, precision)
    if attention == "auto":
        attention = "efficient"
    profile = _profile(profile)
    shape = StepShape(_model_key(profile), mp._stage(stage), batch_size, _round_length(seq_length, profile),
                      attention, loss, round(answer_fraction, 2), precision, lora_r)
    count = _scaled_count(shape)
    n_quant, quant_weights = _quantized(shape.profile, shape.stage, lora_r)
    out = _micro_seconds(count, spec, cal, checkpointing, n_quant, quant_weights)
    recomputed = sum(f for f, in_layer in zip(count.flops, count.layer_forward) if in_layer) if checkpointing else 0
    out.update(flops=count.total_flops + recomputed, bytes=count.total_bytes, precision=precision)
    return out


def _round_length(seq_length: int, profile) -> int:
    """Counted lengths are rounded up to a multiple of 64 tokens (fewer distinct counts to cache; a slight
    over-estimate), of 8 below 256 tokens."""
    quantum = 64 if seq_length > 256 else 8
    return max(profile.image_seq_length + 2, int(math.ceil(seq_length / quantum) * quantum))


def fit_calibration(points=None, gpu: str = CALIBRATION_GPU) -> tuple[Calibration, list[dict]]:
    """Grid-search the efficiencies and the host cost per kernel that best reproduce measured step times."""
    points = points or CALIBRATION_POINTS
    spec = _spec(gpu)
    counts = []
    for stage, batch, tokens, ckpt, attention, loss, seconds in points:
        shape = StepShape(_model_key("full"), stage, batch, tokens, attention, loss, 1.0)
        n_quant, weights = _quantized(_model_key("full"), stage)
        counts.append((_scaled_count(shape), ckpt, n_quant, weights, seconds))
    best = None
    for mm in [x / 20 for x in range(4, 21)]:  # 0.2 .. 1.0
        for bw in [x / 20 for x in range(4, 21)]:
            for host in [x * 5e-6 for x in range(1, 21)]:  # 5 .. 100 us
                cal = Calibration(mm, bw, host)
                err = sum(math.log(_micro_seconds(c, spec, cal, ck, nq, w)["seconds"] / s) ** 2
                          for c, ck, nq, w, s in counts)
                if best is None or err < best[0]:
                    best = (err, cal)
    cal = dataclasses.replace(best[1], source=f"fitted to {len(points)} step times measured on an {gpu}")
    rows = []
    for (stage, batch, tokens, ckpt, attention, loss, seconds), (c, ck, nq, w, _) in zip(points, counts):
        r = _micro_seconds(c, spec, cal, ck, nq, w)
        rows.append({"stage": stage, "batch": batch, "tokens": tokens, "checkpointing": ckpt, "attention": attention,
                     "measured_s": seconds, "planned_s": r["seconds"], "bound": r["bound"]})
    return cal, rows


# --------------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataShape:
    """Lengths (tokens, image placeholders included) of a stage's training examples and their answer share.

    `measured`: taken from the real data set (then the recipe may size micro-batches by the tokens they really
    hold); `longest`: the longest example possible (the memory plan's worst case)."""

    lengths: tuple
    answer_fraction: float
    source: str  # "measured on the data set" or what was assumed
    measured: bool = False
    longest: int | None = None

    @property
    def mean_length(self) -> float:
        return sum(self.lengths) / len(self.lengths)

    @property
    def max_length(self) -> int:
        return self.longest or max(self.lengths)

    @classmethod
    def from_dataset(cls, dataset, sample: int = 8192) -> "DataShape":
        n = len(dataset)
        step = max(1, n // sample)
        lengths, targets, tokens = [], 0, 0
        for i in range(0, n, step):
            ex = dataset[i]
            lengths.append(len(ex["input_ids"]))
            targets += sum(1 for y in ex["labels"][1:] if y != -100)
            tokens += len(ex["input_ids"]) - 1
        return cls(tuple(lengths), targets / max(tokens, 1),
                   f"measured on the data set ({len(lengths)} of {n} examples)", measured=True)


def assumed_data(profile, stage: str) -> DataShape:
    """Full profile without the data at hand: COCO captions are 49 image tokens + ~34 text tokens (83 in the H200
    measurement; none longer than 160); LLaVA-Instruct-150K conversations are assumed log-normal around 270 tokens
    (mean ~300) up to the profile's max_length, 55 % of them answer tokens. Tiny profile: the synthetic world's
    sizes."""
    profile = _profile(profile)
    stage = mp._stage(stage)
    spec = profile.projection if stage == "projection" else profile.instruct
    n_img = profile.image_seq_length
    if profile.world is not None:  # tiny: captions of ~26 tokens; dialogues of 1-3 turns, ~30-110 tokens
        if stage == "projection":
            return DataShape(tuple([n_img + 26] * 64), 0.15, "assumed (tiny world)", longest=spec.max_length)
        dist = torch.distributions.LogNormal(math.log(60.0), 0.35)
        qs = torch.linspace(0.005, 0.995, 200, dtype=torch.float64)
        lengths = dist.icdf(qs).clamp(n_img + 10, spec.max_length).round().long().tolist()
        return DataShape(tuple(lengths), 0.08, "assumed (tiny world)", longest=spec.max_length)
    if stage == "projection":
        return DataShape(tuple([n_img + 34] * 64), 0.18, "assumed: COCO captions, 83 tokens (at most 160), "
                         "18 % answer tokens", longest=min(160, spec.max_length))
    dist = torch.distributions.LogNormal(math.log(270.0), 0.45)
    qs = torch.linspace(0.0005, 0.9995, 2000, dtype=torch.float64)
    lengths = dist.icdf(qs).clamp(n_img + 20, spec.max_length).round().long().tolist()
    return DataShape(tuple(lengths), 0.55, "assumed: LLaVA-Instruct log-normal, median 270 tokens, 55 % answers",
                     longest=spec.max_length)


@dataclass(frozen=True)
class Padding:
    mean_row: float  # mean tokens per row after padding
    max_tokens: int  # the most padded tokens in one micro-batch
    max_rows: int  # the most rows in one micro-batch


def simulate_padding(data: DataShape, batch_size: int, grad_accum: int, balanced: bool, seed: int = 0) -> Padding:
    """Micro-batches padded to their longest row, on the data's lengths: random micro-batches (the plain way) or
    transformers' BatchRebalanceSampler cutting each random optimizer batch by length (the course's stage 03)."""
    lengths = list(data.lengths)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    lengths = [lengths[i] for i in order]
    if balanced and grad_accum > 1 and len(lengths) >= batch_size * grad_accum:
        from transformers.trainer_pt_utils import BatchRebalanceSampler

        sampler = BatchRebalanceSampler(lengths, batch_size * grad_accum, 1, grad_accum, seed=seed, drop_last=True)
        micro = list(sampler)
    else:
        micro = [list(range(i, min(i + batch_size, len(lengths)))) for i in range(0, len(lengths), batch_size)]
    padded = [len(mb) * max(lengths[i] for i in mb) for mb in micro]
    return Padding(sum(padded) / sum(len(mb) for mb in micro), max(padded), max(len(mb) for mb in micro))


def padded_length(data: DataShape, batch_size: int, grad_accum: int, balanced: bool, seed: int = 0) -> float:
    """Mean tokens per row after padding each micro-batch to its longest row (see simulate_padding)."""
    return simulate_padding(data, batch_size, grad_accum, balanced, seed).mean_row


# ------------------------------------------------------------------------------------------------------- the plan


@dataclass
class TimePlan:
    profile: str
    stage: str
    gpu: str
    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    attention: str
    loss: str
    balanced: bool
    n_examples: int
    steps: int
    mean_length: float
    padded_length: float
    micro_step: dict
    optimizer_seconds: float
    data_source: str
    calibration: str
    measured_gpu: bool
    notes: list = field(default_factory=list)
    batch_overhead_seconds: float = 0.0  # the calibration's per-micro-batch cost of real data
    precision: str = "bf16"  # "bf16", "fp16" (Phi's attention in fp32) or "fp32"

    @property
    def step_seconds(self) -> float:
        return self.grad_accum * (self.micro_step["seconds"] + self.batch_overhead_seconds) + self.optimizer_seconds

    @property
    def hours(self) -> float:
        return self.steps * self.step_seconds / 3600

    @property
    def tokens_per_second(self) -> float:
        """Real (unpadded) tokens per second."""
        return self.batch_size * self.grad_accum * self.mean_length / self.step_seconds

    def mfu(self, n_params: float) -> float:
        """Model FLOPs utilisation in the usual convention: 6 x parameters x real tokens over the matmul peak of
        the precision trained in (bf16 or fp16 tensor cores, or fp32)."""
        return 6 * n_params * self.tokens_per_second / (_spec(self.gpu).peak_tflops(self.precision) * 1e12)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(step_seconds=self.step_seconds, hours=self.hours, tokens_per_second=self.tokens_per_second)
        return d


def plan_time(profile="full", stage: str = "instruct", gpu="T4", batch_size: int | None = None,
              grad_accum: int | None = None, gradient_checkpointing: bool | None = None, attention: str = "auto",
              loss: str = "answer", balanced: bool | None = None, n_examples: int | None = None,
              data: DataShape | None = None, epochs: float | None = None, cal: Calibration | None = None,
              max_steps: int | None = None, precision: str = "auto") -> TimePlan:
    """Seconds per optimizer step and hours for `stage` of `profile` on `gpu`, at the profile's settings unless
    given. ``balanced`` (default: stage 03 as the course trains it) = length-balanced micro-batches; ``data`` = the
    stage's length distribution (``DataShape.from_dataset(dataset)``; default: ``assumed_data``); ``precision``:
    "auto" (the course's: bf16 where native, fp16 on a T4 or V100), "bf16", "fp16" or "fp32"."""
    profile = _profile(profile)
    stage = mp._stage(stage)
    spec = profile.projection if stage == "projection" else profile.instruct
    gpu_spec = _spec(gpu)
    batch_size = batch_size or spec.batch_size
    grad_accum = grad_accum or spec.grad_accum
    ckpt = profile.checkpointing(stage) if gradient_checkpointing is None else gradient_checkpointing
    balanced = (stage == "instruct") if balanced is None else balanced
    data = data or assumed_data(profile, stage)
    precision = mp.precision_for(gpu_spec.key, precision)
    if attention == "auto":
        attention = "efficient"  # bf16 / fp16 / fp32 (the fp16 plan's attention): all have the memory-efficient kernel
    n_examples = n_examples or profile.n_train_samples or len(data.lengths)
    epochs = spec.epochs if epochs is None else epochs
    steps = max_steps or spec.max_steps
    if not steps or steps <= 0:
        steps = max(1, math.ceil(math.ceil(n_examples / (batch_size * grad_accum)) * epochs))
    padded = padded_length(data, batch_size, grad_accum, balanced)
    micro = micro_step_seconds(profile, stage, gpu_spec, batch_size, int(round(padded)), ckpt, attention, loss,
                               data.answer_fraction if loss == "answer" else 1.0, cal, precision=precision)
    cal = cal or CALIBRATION
    trainable = _trainable_parameters(_model_key(profile), stage)
    # AdamW + clipping: 60 bytes per trainable parameter; fp16's gradient scaler unscales and checks every fp32
    # gradient once more (read + write: 8 bytes)
    optimizer = ((60 + (8 if precision == "fp16" else 0)) * trainable
                 / (gpu_spec.bandwidth_gbs * 1e9 * cal.bandwidth_efficiency))
    notes = [f"data: {data.source}; mean {data.mean_length:.0f} tokens, padded to {padded:.0f} "
             f"({'length-balanced' if balanced and grad_accum > 1 else 'random'} micro-batches)",
             f"speed: {cal.source}" + ("" if gpu_spec.key == CALIBRATION_GPU else
                                      f"; {gpu_spec.key}: same fractions of its own peaks assumed, not measured")]
    notes.append(f"precision: {PRECISION_NOTES[precision]}")
    if gpu_spec.note:
        notes.append(f"{gpu_spec.key}: {gpu_spec.note}")
    return TimePlan(profile=profile.name, stage=stage, gpu=gpu_spec.key, batch_size=batch_size,
                    grad_accum=grad_accum, gradient_checkpointing=ckpt, attention=attention, loss=loss,
                    balanced=balanced, n_examples=n_examples, steps=steps, mean_length=data.mean_length,
                    padded_length=padded, micro_step=micro, optimizer_seconds=optimizer,
                    data_source=data.source, calibration=cal.source, measured_gpu=gpu_spec.key == CALIBRATION_GPU,
                    notes=notes, batch_overhead_seconds=cal.batch_overhead_seconds * gpu_spec.host_factor,
                    precision=precision)


PRECISION_NOTES = {
    "bf16": "bf16 autocast (bf16 tensor cores)",
    "fp16": "fp16 autocast with a gradient scaler (fp16 tensor cores); Phi's attention in fp32 "
            "(helpers.models.precision.fp32_score_attention), priced at the fp32 rate",
    "fp32": "fp32 (no autocast; fp32 matmuls)",
}


@functools.lru_cache(maxsize=16)
def _trainable_parameters(profile, stage: str) -> int:
    model, _ = mp._stage_model(mp.model_key(profile), mp._stage(stage), torch.bfloat16, True, None)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@functools.lru_cache(maxsize=4)
def lm_parameters(profile) -> int:
    """Parameters of the language model with its head (N in the 6 x N x tokens convention)."""
    model = mp.meta_llava(_profile(profile))
    return sum(p.numel() for n, p in model.named_parameters()
               if "vision_tower" not in n and "multi_modal_projector" not in n)


def format_time_plan(plan: TimePlan) -> str:
    m = plan.micro_step
    n_params = lm_parameters(plan.profile) if plan.profile in ("tiny", "full") else None
    lines = [
        f"Time plan: profile {plan.profile}, stage {plan.stage}, {plan.gpu}"
        + (" (calibrated on this GPU)" if plan.measured_gpu else " (assumed efficiency, see notes)"),
        f"  micro-batch {plan.batch_size} x ~{plan.padded_length:.0f} tokens x {plan.grad_accum} accumulated = "
        f"{plan.batch_size * plan.grad_accum} examples per step; {plan.precision}; checkpointing "
        f"{'on' if plan.gradient_checkpointing else 'off'}, attention {plan.attention}, loss {plan.loss}",
        f"  one micro-step: {m['seconds']:.3f} s ({m['bound']}-bound: GPU {m['gpu_s']:.3f} s, host "
        f"{m['host_s']:.3f} s for {m['kernels']:,} kernels)",
        f"  one optimizer step: {plan.step_seconds:.1f} s; {plan.steps:,} steps for {plan.n_examples:,} examples",
        f"  => {plan.hours:.2f} h ({plan.hours * 60:.0f} min); {plan.tokens_per_second:,.0f} real tokens/s"
        + (f", MFU {100 * plan.mfu(n_params):.0f} % (6 x {n_params / 1e9:.2f}B params x tokens)"
           if n_params else ""),
    ]
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def print_time_plan(plan: TimePlan) -> TimePlan:
    print(format_time_plan(plan))
    return plan


def show(profile="full", stage: str = "instruct", gpu=None, dataset=None, memory: bool = True, **settings):
    """Print the memory plan and the time plan of `stage` for `gpu` (default: the GPU in use, else a T4).
    `settings`: batch_size, grad_accum, gradient_checkpointing, n_examples, loss, ... Returns (memory, time)."""
    gpu = gpu or detect_gpu() or "T4"
    data = DataShape.from_dataset(dataset) if dataset is not None else None
    profile = _profile(profile)
    mem = None
    if memory:
        mem_kwargs = {k: settings[k] for k in ("batch_size", "grad_accum", "gradient_checkpointing", "loss")
                      if k in settings}
        mem = mp.print_plan(mp.plan_memory(profile, stage, gpu=_spec(gpu).key, **mem_kwargs))
    plan = print_time_plan(plan_time(profile, stage, gpu, data=data,
                                     n_examples=settings.pop("n_examples", None) or
                                     (len(dataset) if dataset is not None else None), **settings))
    return mem, plan


def time_table(profile="full", gpus=None, stages=("projection", "instruct"), recipes: bool = False) -> str:
    """Markdown: seconds per optimizer step and hours per stage at the profile's settings (or each GPU's recipe)."""
    gpus = gpus or TABLE_GPUS
    head = ("| stage | GPU | precision | micro-batch x accum | ckpt | s / micro-step | bound | s / step | steps "
            "| hours | tokens/s |")
    lines = [head, "|" + "---|" * 11]
    for stage in stages:
        for gpu in gpus:
            if recipes:
                r = recipe_for_gpu(profile, gpu).stages[mp._stage(stage)]
                plan = r.time
            else:
                plan = plan_time(profile, stage, gpu)
            m = plan.micro_step
            lines.append(f"| {plan.stage} | {plan.gpu} | {plan.precision} | {plan.batch_size} x {plan.grad_accum} | "
                         f"{'on' if plan.gradient_checkpointing else 'off'} | {m['seconds']:.2f} | "
                         f"{m['bound'].split(' ')[0]} | {plan.step_seconds:.1f} | {plan.steps} | {plan.hours:.2f} | "
                         f"{plan.tokens_per_second:,.0f} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- the recipe


def memory_shape(data: DataShape, batch_size: int, grad_accum: int, balanced: bool) -> tuple[int, int, str]:
    """(rows, tokens per row, why) to plan a micro-batch's memory with.

    The safe default is every row at the longest possible length. With the real data's lengths and length-balanced
    micro-batches, a micro-batch of long rows has few of them: the plan then covers the most padded tokens any
    simulated micro-batch held, plus 25 %, as rows of the longest length (memory grows with the tokens of a
    micro-batch, and with their length for the attention, so this covers every micro-batch up to that size)."""
    longest = data.max_length
    if not (data.measured and balanced and grad_accum > 1):
        return batch_size, longest, f"every row at {longest} tokens"
    pad = simulate_padding(data, batch_size, grad_accum, balanced=True)
    rows = min(batch_size * 4, max(1, math.ceil(1.25 * pad.max_tokens / longest)))
    return rows, longest, (f"the largest simulated micro-batch, {pad.max_tokens:,} padded tokens, + 25 %, as {rows} "
                           f"rows of {longest}")

# what the full profile's sources hold (records a stage can use): COCO 2017 train captions, LLaVA-Instruct-150K
SOURCE_RECORDS = {"projection": 591_753, "instruct": 157_712}  # COCO train2017 captions, LLaVA-Instruct-150K
CAPTIONS_PER_IMAGE = 5  # COCO: 591,753 captions of 118,287 images


@dataclass
class StageRecipe:
    stage: str
    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    n_examples: int
    max_steps: int
    save_steps: int
    memory: mp.MemoryPlan
    time: TimePlan
    reason: str

    def stage_spec(self, spec):
        """The profile's StageSpec with this recipe's micro-batch, accumulation, steps, checkpointing and
        checkpoint interval."""
        return dataclasses.replace(spec, batch_size=self.batch_size, grad_accum=self.grad_accum,
                                   max_steps=self.max_steps, gradient_checkpointing=self.gradient_checkpointing,
                                   save_steps=self.save_steps)


@dataclass
class Recipe:
    gpu: str
    budget_hours: float
    stages: dict
    precision: str = "bf16"  # what every stage trains in (helpers.models.precision on that GPU, unless asked otherwise)

    def profile_for(self, profile, stage: str):
        """`profile` with this recipe's settings for `stage` (its StageSpec, with gradient checkpointing)."""
        profile = _profile(profile)
        field_name = "projection" if mp._stage(stage) == "projection" else "instruct"
        return profile.replace(**{field_name: self.stages[field_name].stage_spec(getattr(profile, field_name))})

    def summary(self) -> str:
        lines = [f"Recipe for {self.gpu} in {self.precision} (budget {self.budget_hours:g} h per stage):"]
        for r in self.stages.values():
            lines.append(f"  {r.stage}: micro-batch {r.batch_size} x {r.grad_accum} accumulated, checkpointing "
                         f"{'on' if r.gradient_checkpointing else 'off'}, {r.n_examples:,} examples = "
                         f"{r.max_steps} steps of {r.time.step_seconds:.1f} s = {r.time.hours:.2f} h, "
                         f"checkpoint every {r.save_steps} steps; peak {r.memory.total_bytes / GiB:.1f} of "
                         f"{r.memory.gpu_gib:.1f} GiB")
            lines.append(f"    why: {r.reason}")
        return "\n".join(lines)


def recipe_for_gpu(profile="full", gpu=None, budget_hours: float = 2.0, data: dict | None = None,
                   available: dict | None = None, checkpoint_minutes: float = 15.0,
                   headroom_gib: float | None = None, precision: str = "auto") -> Recipe:
    """Settings for each stage on `gpu` (default: the GPU in use) that keep the recipe's effective batch (micro-batch
    x accumulation) and finish within `budget_hours`.

    For each stage: among micro-batches that divide the effective batch, with and without gradient checkpointing,
    keep those whose memory plan (worst case: every row at max_length; see memory_shape) fits with `headroom_gib` to
    spare (default 8 % of the GPU, at least 1.5 GiB: the allocator's fragmentation is not in the plan), and take
    the fastest by the time plan (within 3 %, the biggest micro-batch). Then as many examples as the budget allows (90 % of it, the rest for evaluation and
    saving), at most what the source holds (`available`, default SOURCE_RECORDS) and at least one step; a checkpoint
    every `checkpoint_minutes` so a disconnected session loses little. `data`: {stage: DataShape} (default: assumed).
    `precision`: "auto" (the course's on that GPU: bf16 where native, fp16 on a T4 or a V100) or one to compare.
    """
    profile = _profile(profile)
    gpu_key = _spec(gpu or detect_gpu() or "T4").key
    precision = mp.precision_for(gpu_key, precision)
    if headroom_gib is None:
        headroom_gib = max(1.5, 0.08 * mp.GPUS[gpu_key].memory_gib)
    available = {**SOURCE_RECORDS, **(available or {})}
    data = data or {}
    stages = {}
    for stage in ("projection", "instruct"):
        spec = profile.projection if stage == "projection" else profile.instruct
        effective = spec.batch_size * spec.grad_accum
        shape = data.get(stage) or assumed_data(profile, stage)
        balanced = stage == "instruct"
        options = []
        for batch in (1, 2, 4, 8, 16, 32, 64):
            if effective % batch:
                continue
            rows, length, basis = memory_shape(shape, batch, effective // batch, balanced)
            for ckpt in (False, True):
                mem = mp.plan_memory(profile, stage, gpu=gpu_key, batch_size=rows, seq_length=length,
                                     gradient_checkpointing=ckpt, grad_accum=effective // batch, loss="answer",
                                     answer_fraction=1.0, precision=precision)
                if mem.headroom_bytes < headroom_gib * GiB:
                    continue
                t = plan_time(profile, stage, gpu_key, batch_size=batch, grad_accum=effective // batch,
                              gradient_checkpointing=ckpt, data=shape, n_examples=effective, balanced=balanced,
                              precision=precision)
                options.append((t.step_seconds, batch, ckpt, mem, t, basis))
        if not options:
            raise ValueError(f"no micro-batch of stage {stage} fits a {gpu_key} in {precision} "
                             "(see helpers.planning.memory_plan)")
        fastest = min(o[0] for o in options)
        # within 3 % of the fastest, prefer the biggest micro-batch, then no checkpointing
        step_s, batch, ckpt, mem, _, basis = max((o for o in options if o[0] <= 1.03 * fastest),
                                                 key=lambda o: (o[1], not o[2]))
        steps_budget = max(1, int(0.9 * budget_hours * 3600 / step_s))
        steps_all = max(1, math.ceil(available[stage] / effective))
        steps = min(steps_budget, steps_all)
        n_examples = min(available[stage], steps * effective)
        t = plan_time(profile, stage, gpu_key, batch_size=batch, grad_accum=effective // batch,
                      gradient_checkpointing=ckpt, data=shape, n_examples=n_examples, max_steps=steps,
                      balanced=balanced, precision=precision)
        save_steps = max(1, min(steps, int(checkpoint_minutes * 60 / t.step_seconds)))
        why = [f"{gpu_key} in {precision}: micro-batch {batch} {'with' if ckpt else 'without'} gradient "
               f"checkpointing is the fastest setting whose memory plan fits ({mem.total_bytes / GiB:.1f} of "
               f"{mem.gpu_gib:.1f} GiB, {basis})"]
        if ckpt and any(o[1] == batch and not o[2] for o in options):
            why.append("without checkpointing it fits too but is slower")
        elif ckpt:
            why.append("without checkpointing it does not fit")
        unfit = [b for b in (1, 2, 4, 8, 16, 32, 64) if effective % b == 0 and b > batch
                 and not any(o[1] == b for o in options)]
        if unfit:
            why.append(f"micro-batch {unfit[0]} does not fit")
        elif any(o[1] > batch for o in options):
            why.append("bigger micro-batches fit but are not faster")
        why.append(f"{effective // batch} accumulated micro-batches keep the recipe's {effective} examples per step")
        if steps == steps_all:
            why.append(f"the whole source ({available[stage]:,} records) fits the {budget_hours:g} h budget")
        else:
            why.append(f"{budget_hours:g} h at {t.step_seconds:.1f} s per step allow {steps} steps = "
                       f"{n_examples:,} examples of the {available[stage]:,} available")
        stages[stage] = StageRecipe(stage, batch, effective // batch, ckpt, n_examples, steps, save_steps, mem, t,
                                    "; ".join(why))
    return Recipe(gpu_key, budget_hours, stages, precision)


RECIPE_FIELDS = ("batch_size", "grad_accum", "max_steps", "gradient_checkpointing", "save_steps", "n_examples")


@functools.lru_cache(maxsize=8)
def _fitted_settings(profile, gpu: str, hours: float) -> dict:
    """recipe_for_gpu's choices as plain settings, cached on disk (the plans take a minute on a small CPU; every
    notebook asks for them): ``$MMPHI_CACHE`` or ``~/.cache/mmphi``, keyed by everything they depend on."""
    import hashlib
    import json
    import os
    from pathlib import Path

    # the precision and the GPU's figures are in the key: recipes cached when a T4 trained in fp32 are not reused
    key = hashlib.sha256(repr((profile, gpu, hours, CALIBRATION, mp.MEASURED_EXTRA_GIB, RECIPE_FIELDS,
                               mp.precision_for(gpu), _spec(gpu), mp.GPUS[gpu], 2)).encode())
    cache = Path(os.environ.get("MMPHI_CACHE") or Path.home() / ".cache" / "mmphi") / "gpu_recipes"
    path = cache / f"{key.hexdigest()[:20]}.json"
    if path.exists():
        return json.loads(path.read_text())
    recipe = recipe_for_gpu(profile, gpu, budget_hours=hours)
    settings = {stage: {f: getattr(r, f) for f in RECIPE_FIELDS} for stage, r in recipe.stages.items()}
    settings["summary"] = recipe.summary()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(settings, indent=1))
        tmp.replace(path)
    except OSError:  # a read-only home: recompute next time
        pass
    return settings


def fit_to_gpu(profile, gpu=None, verbose: bool = True):
    """`profile` with :func:`recipe_for_gpu`'s settings for the GPU found (its ``gpu_hours_per_stage`` budget):
    per stage the micro-batch, accumulation, steps, checkpointing and checkpoint interval, and enough data for both
    stages (``n_train_samples`` counts images for stage 02, about CAPTIONS_PER_IMAGE captions each, and conversations
    for stage 03). A setting the user gave (``profile.pinned``) is kept. Unchanged for the tiny profile (no budget)
    and without a GPU that the plans know. `verbose` prints what was chosen and why."""
    if not profile.gpu_hours_per_stage:
        return profile
    gpu = gpu or detect_gpu()
    if gpu is None:
        if verbose:
            found = f"{torch.cuda.get_device_name()}: no time plan for this GPU" if torch.cuda.is_available() else \
                "no GPU here"
            print(f"{found}, so the settings are as written in helpers/config.py")
        return profile
    # planned with the user's settings in place (a longer sequence or another checkpoint changes the plan)
    settings = _fitted_settings(profile.replace(pinned=frozenset()), _spec(gpu).key, profile.gpu_hours_per_stage)
    changes = {}
    for stage in ("projection", "instruct"):
        chosen = {k: v for k, v in settings[stage].items()
                  if k != "n_examples" and f"{stage}.{k}" not in profile.pinned}
        changes[stage] = dataclasses.replace(getattr(profile, stage), **chosen)
    if "n_train_samples" not in profile.pinned:
        images = math.ceil(settings["projection"]["n_examples"] / CAPTIONS_PER_IMAGE)
        changes["n_train_samples"] = max(images, settings["instruct"]["n_examples"])
    if verbose:
        kept = sorted(k for k in profile.pinned if k.split(".")[0] in ("projection", "instruct", "n_train_samples"))
        print(settings["summary"] + (f"\nkept as you set them: {', '.join(kept)}" if kept else ""))
    return profile.replace(**changes)


# ------------------------------------------------------------------------------------------------ live progress


def eta_callback(plan: TimePlan | None = None):
    """A TrainerCallback adding the measured and the planned seconds per optimizer step and the ETA to every
    logged row (Trainer's progress bar shows its own remaining time as well)."""
    from transformers import TrainerCallback

    class EtaCallback(TrainerCallback):
        def __init__(self):
            self.start = None
            self.start_step = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.start_step = time.perf_counter(), state.global_step
            if plan is not None:
                print(f"planned: {plan.step_seconds:.1f} s per step, {plan.hours:.2f} h for {plan.steps} steps "
                      f"on {plan.gpu}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or self.start is None or state.global_step <= self.start_step:
                return
            per_step = (time.perf_counter() - self.start) / (state.global_step - self.start_step)
            logs["s_per_step"] = round(per_step, 3)
            logs["eta_min"] = round(per_step * (state.max_steps - state.global_step) / 60, 1)
            if plan is not None:
                logs["planned_s_per_step"] = round(plan.step_seconds, 3)

    return EtaCallback()


def announce(profile, stage: str, dataset=None, gpu=None, **settings):
    """What a full-profile training cell prints before it starts: the memory plan and the time plan for the GPU in
    use (nothing on a machine without CUDA unless `gpu` is given). Returns the TimePlan (or None)."""
    gpu = gpu or detect_gpu()
    if gpu is None:
        if torch.cuda.is_available():
            print(f"GPU {torch.cuda.get_device_name()} is not in helpers.planning.time_plan.GPU_SPECS: no plan printed")
        return None
    try:
        _, plan = show(profile, stage, gpu=gpu, dataset=dataset, **settings)
    except Exception as exc:  # a plan must never stop training
        print(f"(no plan: {type(exc).__name__}: {exc})")
        return None
    return plan


def training_callbacks(profile, stage: str, dataset=None, gpu=None) -> list:
    """What a stage's training function adds on a GPU: the memory and time plans printed for the GPU in use (with
    the stage's real settings and the data set's lengths) and an :func:`eta_callback` comparing the measured
    seconds per step with the plan. On a CPU (the tiny course) nothing is printed and no callback is added."""
    if gpu is None and not torch.cuda.is_available():
        return []
    profile = _profile(profile)
    stage = mp._stage(stage)
    spec = profile.projection if stage == "projection" else profile.instruct
    plan = announce(profile, stage, dataset=dataset, gpu=gpu, batch_size=spec.batch_size, grad_accum=spec.grad_accum,
                    gradient_checkpointing=profile.checkpointing(stage))
    return [eta_callback(plan)]
