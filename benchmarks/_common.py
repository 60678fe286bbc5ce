"""Shared by the benchmark scripts: device choice, random models of either size, timing, tables, JSON."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=["tiny", "phi2"], default="tiny",
                        help="tiny: the tiny profile's sizes; phi2: Phi-2 / CLIP ViT-B/32 sizes from helpers.config.FULL "
                             "(random weights; meant for a GPU)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cuda or cpu")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: steady numbers even on a machine shared with other work; "
                             "0 = every core, as the course trains)")
    return parser


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup_threads(device: torch.device, threads: int = 0) -> None:
    if device.type == "cpu":
        torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0))))


def precision(device: torch.device) -> torch.dtype:
    """What the course uses there (helpers.models.precision): bf16 / fp16 on a GPU, fp32 on a CPU."""
    from helpers.models.precision import current

    return current().dtype if device.type == "cuda" else torch.float32


def machine(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 2),
                    compute_capability=f"{props.major}.{props.minor}")
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def profile_for(size: str):
    from helpers.config import FULL, TINY

    return FULL if size == "phi2" else TINY


def stand_in_tokenizer(profile):
    from helpers.planning.memory_plan import StandInTokenizer

    return StandInTokenizer.for_profile(profile)


def random_llava(profile, device: torch.device, lm_dtype: torch.dtype, seed: int = 0, vision=None):
    """A randomly initialised LLaVA of the profile's sizes (Phi LM + CLIP ViT tower + projector), assembled by the
    course's own helpers.models.modeling.assemble_llava. `vision` overrides the tower's VisionSpec."""
    from transformers import CLIPVisionModel, PhiForCausalLM

    from helpers.models.modeling import assemble_llava, clip_vision_config, phi_config

    if vision is not None:
        profile = profile.replace(vision=vision)
    tok = stand_in_tokenizer(profile)
    torch.manual_seed(seed)
    with torch.device(device):
        lm = PhiForCausalLM._from_config(phi_config(profile.phi, tok), dtype=lm_dtype)
        tower = CLIPVisionModel(clip_vision_config(profile.vision))
    tower.requires_grad_(False).eval()
    model = assemble_llava(lm, tower, tok, profile, seed=seed).to(device)
    return model, tok, profile


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeats` calls of fn after `warmup` calls (synchronised on a GPU)."""
    return time_interleaved({"_": fn}, device, repeats, warmup)["_"]["wall"]


def time_interleaved(fns: dict, device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Time several ways in turns (A B A B ...), so that a machine shared with other work slows them alike.

    Returns {name: {"wall": [seconds...], "cpu": [process CPU seconds...]}}. On a CPU the process CPU time (all
    threads) measures the work done even when other processes compete for the cores.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    out = {name: {"wall": [], "cpu": []} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            out[name]["wall"].append(time.perf_counter() - wall)
            out[name]["cpu"].append(time.process_time() - cpu)
    return out


def load_note() -> str:
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    cores = len(os.sched_getaffinity(0))
    return (f"load average {load:.1f} on {cores} cores" +
            (" - the machine is shared: compare ratios, and CPU seconds rather than wall seconds"
             if load > cores + 0.5 else ""))


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return None


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
    return str(v)


def save_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=str))
    print(f"results written to {path}")


# ------------------------------------------------------------------------------------- shared by the new benchmarks
class Deadline:
    """A run's own time limit: phases ask `left()` / `expired()` and skip what no longer fits (nothing crashes)."""

    def __init__(self, seconds: float | None):
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return float("inf") if not self.seconds else self.seconds - self.elapsed()

    def expired(self, reserve: float = 0.0) -> bool:
        return self.left() <= reserve


def add_time_limit(parser: argparse.ArgumentParser, default: float) -> None:
    parser.add_argument("--time-limit", type=float, default=default,
                        help=f"seconds this run may take (default {default:g}); what no longer fits is skipped and "
                             "reported, the JSON is written either way")


def gpu_key(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    from helpers.planning.time_plan import detect_gpu

    return detect_gpu()


def gpu_memory(device: torch.device):
    """helpers.planning.memory_plan.GPU of this CUDA device (for plans)."""
    from helpers.planning.memory_plan import GPU

    props = torch.cuda.get_device_properties(device)
    return GPU(props.name, props.total_memory / 2 ** 30, native_bf16=props.major >= 8)


def random_4bit_llava(profile, device: torch.device, cache_dir: str | os.PathLike, seed: int = 0):
    """A random LLaVA of the profile's sizes saved once under `cache_dir` (reused by later runs), then loaded the
    course's way: notebook 03's own "load-4bit" (LLM in 4-bit nf4) and "lora" cells (profile's LoRA settings,
    gradient checkpointing as the profile says). Returns (peft model, stand-in tokenizer, profile)."""
    from helpers.course import run_cells

    path = Path(cache_dir)
    if not (path / "config.json").exists():
        lm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model, _tok, _ = random_llava(profile, device, lm_dtype, seed=seed)
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model = run_cells("03_qlora_instruct", ["load-4bit", "lora"], checkpoint=path, profile=profile)["model"]
    return model, stand_in_tokenizer(profile), profile


def set_checkpointing(model, on: bool) -> None:
    """Gradient checkpointing on (the course's default arguments, as peft's prepare_model_for_kbit_training sets it)
    or off, on a (peft-wrapped) LLaVA."""
    import warnings

    from helpers.train.training import _llava_of

    llava = _llava_of(model)
    with warnings.catch_warnings():  # transformers 5.2x renames these to activation_checkpointing_*
        warnings.simplefilter("ignore", FutureWarning)
        if on:
            llava.gradient_checkpointing_enable()
            if hasattr(llava, "enable_input_require_grads"):
                llava.enable_input_require_grads()
        else:
            llava.gradient_checkpointing_disable()


def synthetic_conversations(profile, lengths: list[int], answer_fraction: float, seed: int = 0) -> list[dict]:
    """Training examples shaped like the course's (helpers.data.multimodal_data.ConversationDataset): image placeholders
    first, random text tokens, answer spans as labels (about `answer_fraction` of the text), cached vision
    features."""
    from helpers.planning.memory_plan import StandInTokenizer

    tok = StandInTokenizer.for_profile(profile)
    g = torch.Generator().manual_seed(seed)
    n_img = profile.image_seq_length
    vocab = min(profile.phi.vocab_size, tok.n_tokens)
    examples = []
    for length in lengths:
        length = max(length, n_img + 8)
        ids = torch.randint(2, vocab - 1, (length,), generator=g)
        ids[1:1 + n_img] = tok.image_token
        labels = torch.full((length,), -100, dtype=torch.long)
        text = length - 1 - n_img
        answer = max(1, int(round(answer_fraction * text)))
        start = length - answer  # one answer span at the end (its position does not change the cost)
        labels[start:] = ids[start:]
        features = torch.randn(n_img, profile.vision.hidden_size, generator=g)
        examples.append({"input_ids": ids.tolist(), "labels": labels.tolist(), "vision_features": features})
    return examples


def start(args, parser):
    """(deadline, device) from the common arguments, threads set; ``--size phi2`` needs a GPU."""
    deadline = Deadline(args.time_limit)
    device = pick_device(args.device)
    setup_threads(device, args.threads)
    if args.size == "phi2" and device.type == "cpu":
        parser.error("--size phi2 needs a GPU")
    return deadline, device
