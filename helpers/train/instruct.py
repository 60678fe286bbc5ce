"""Stage 03's parts that are not its lesson (notebook 03 builds the 4-bit model, the LoRA adapters and the trainer
in its own cells): bitsandbytes details on a CPU, a callback that samples answers at every checkpoint, and the
export of the 4-bit + LoRA model as a plain LLaVA checkpoint, checked from disk.
"""
from __future__ import annotations

import torch

from helpers.data.chat_template import prompt_for_next_answer
from helpers.models import precision
from helpers.models.inference import generate_answers


def keep_4bit_layout_for_training(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight into an inference-only layout the first time the
    layer runs in eval mode without gradients (the validation loss, sample answers during training): training steps
    after that fail ("a view of a leaf Variable ... in-place operation") and the weight no longer dequantizes
    correctly. Training evaluates along the way, so the course keeps the trainable layout. (Nothing to do on a GPU.)"""
    import bitsandbytes as bnb

    if torch.cuda.is_available():
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def quantized_module_names(model) -> list[str]:
    import bitsandbytes as bnb

    return [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def sample_answers_callback(processor, records, n_questions: int = 3, max_new_tokens: int = 16):
    """A TrainerCallback that answers the first questions of a few held-out conversations at every checkpoint,
    greedily with the model as it is then: how the answers change as training goes on. Rows collect in
    ``callback.rows`` as {"step", "question", "expected", "answer"}."""
    from PIL import Image
    from transformers import TrainerCallback

    jobs = []
    for r in records[:n_questions]:
        question = r.messages[0]["content"].split("\n", 1)[-1]
        jobs.append((r.image, prompt_for_next_answer([], question, processor.tokenizer.eos_token), question,
                     r.messages[1]["content"]))

    class SampleAnswers(TrainerCallback):
        def __init__(self):
            self.rows = []

        def on_save(self, args, state, control, model=None, **kwargs):
            if model is None or not state.is_world_process_zero or not jobs:
                return
            images = [Image.open(j[0]).convert("RGB") for j in jobs]
            answers = generate_answers(model, processor, images, [j[1] for j in jobs], max_new_tokens)
            self.rows.extend({"step": state.global_step, "question": j[2], "expected": j[3], "answer": a}
                             for j, (a, _) in zip(jobs, answers))
            model.train()

    return SampleAnswers()


@torch.no_grad()
def effective_weight(layer) -> torch.Tensor:
    """The weight a (possibly 4-bit) linear layer really multiplies by: its output for the identity matrix.

    Independent of bitsandbytes' storage layout: on CPU, bitsandbytes >= 0.49 repacks a 4-bit weight on its first
    forward (``weight.data`` becomes ``[out, in / 2]``) and ``dequantize_4bit`` on the repacked data returns wrong
    numbers, which made the merged export answer at chance after the held-out evaluation had run."""
    weight = layer.weight
    if not hasattr(weight, "quant_state"):
        return weight.data
    dtype = getattr(layer, "compute_dtype", None) or torch.float32
    out = layer(torch.eye(layer.in_features, device=weight.device, dtype=dtype))
    if layer.bias is not None:
        out = out - layer.bias.to(out.dtype)
    return out.T


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def _host_peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@torch.no_grad()
def export_merged(peft_model, base_checkpoint, out_dir, processor, dtype: torch.dtype | None = None,
                  device: str | None = None):
    """Save a plain LlavaForConditionalGeneration equal to the trained 4-bit + LoRA model.

    Each quantized weight is dequantized (the values the adapters were trained against) and its LoRA delta added;
    the trained projector copy replaces the original. The result loads with stock transformers.

    The merged model is built where it will be used, in the precision it answers in (``helpers.models.precision``: bf16
    or fp16 on a GPU, loaded straight from the safetensors shards with ``device_map``; fp32 on a CPU), so the host
    never holds a full-precision copy of the LLM (Phi-2 in fp32 would be ~11 GB: more than a Colab runtime's RAM).
    The memory each step needs is printed.
    """
    from peft.tuners.lora import LoraLayer
    from transformers import LlavaForConditionalGeneration

    policy = precision.current()
    device, dtype = device or policy.device, dtype or policy.dtype
    wrapped = peft_model.get_base_model()
    n_params = sum(p.numel() * (2 if getattr(p, "quant_state", None) is not None else 1)  # 4-bit: 2 per byte
                   for n, p in wrapped.named_parameters() if "lora_" not in n and "modules_to_save" not in n)
    bytes_needed = n_params * torch.finfo(dtype).bits // 8
    print(f"export: building the merged model on {device} in {str(dtype).replace('torch.', '')}: "
          f"{_gib(bytes_needed)} on {'the GPU' if device.startswith('cuda') else 'the host'}"
          + (f" (free now: {_gib(torch.cuda.mem_get_info()[0])})" if device.startswith("cuda") else "")
          + "; weights stream from the stage-02 safetensors, one tensor at a time", flush=True)
    merged = LlavaForConditionalGeneration.from_pretrained(str(base_checkpoint), dtype=dtype, device_map={"": device})
    for name, module in wrapped.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        weight = effective_weight(base)
        delta = module.get_delta_weight("default")
        target = merged.get_submodule(name)
        target.weight.copy_((weight.float() + delta.float()).to(target.weight.device, dtype))
        if base.bias is not None:
            target.bias.copy_(base.bias.to(target.bias.device, dtype))
    projector = wrapped.model.multi_modal_projector
    if hasattr(projector, "modules_to_save"):  # peft's ModulesToSaveWrapper: the trained copy
        projector = projector.modules_to_save["default"]
    merged.model.multi_modal_projector.load_state_dict({k: v.to(dtype) for k, v in projector.state_dict().items()})
    merged.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    merged.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    merged.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    peak = f"GPU peak {_gib(torch.cuda.max_memory_allocated())}, " if device.startswith("cuda") else ""
    print(f"export: saved to {out_dir} ({peak}host peak {_gib(_host_peak_bytes())})", flush=True)
    return merged.eval()


# ------------------------------------------------------------------------ the export, checked from disk
# How far the reloaded export's logits may be from the trained 4-bit + LoRA model's, as a fraction of the largest
# |logit|, by the precision the assistant runs in. fp32: bitsandbytes' CPU 4-bit kernel rounds each layer's output
# to bf16 (~3e-3 per layer on the tests' tiny model) while the merged model does not. bf16/fp16: the merged weights
# themselves are rounded to 8 (bf16) or 11 (fp16) bits of mantissa.
EXPORT_TOLERANCE = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


class ExportMismatch(RuntimeError):
    """The exported assistant, reloaded from disk, does not answer like the model that was trained."""


@torch.no_grad()
def prompt_logits(model, processor, image, prompt: str) -> torch.Tensor:
    """Every position's logits (fp32, on the CPU) for one image and prompt, as the model computes them."""
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    first = next(model.parameters())
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vision_dtype = next(base.model.vision_tower.parameters()).dtype
    inputs = {k: v.to(first.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(vision_dtype)
    was_training = model.training
    model.eval()
    logits = model(**inputs, use_cache=False).logits.float().cpu()
    model.train(was_training)
    return logits


def check_export(trained_logits: torch.Tensor, exported, processor, image, prompt: str,
                 stored_dtype: torch.dtype | None = None) -> dict:
    """Compare the exported assistant (loaded from disk with stock classes) with the trained model's logits on the
    same image and prompt; raise :class:`ExportMismatch` beyond :data:`EXPORT_TOLERANCE` for the coarser of the
    precision it runs in and the one it was stored in (`stored_dtype`: a T4 runs a bf16 export in fp32, its weights
    still rounded to bf16). Returns the figures."""
    got = prompt_logits(exported, processor, image, prompt)
    dtype = next(exported.parameters()).dtype
    tolerance = max(EXPORT_TOLERANCE.get(d, 5e-2) for d in (dtype, stored_dtype or dtype))
    scale = max(1.0, float(trained_logits.abs().max()))
    diff = float((got - trained_logits).abs().max()) if got.shape == trained_logits.shape else float("inf")
    result = {"max_abs_logit_difference": diff, "max_abs_logit": scale, "relative": diff / scale,
              "tolerance": tolerance, "dtype": str(dtype).replace("torch.", "")}
    if not result["relative"] <= result["tolerance"]:
        raise ExportMismatch(
            f"the exported assistant does not answer like the trained model: its logits on a held-out prompt differ "
            f"by up to {diff:.4g} (largest |logit| {scale:.4g}: {result['relative']:.2%} > the tolerance "
            f"{result['tolerance']:.2%} for {result['dtype']}). Notebooks 04 and 05 would load this export.")
    return result
