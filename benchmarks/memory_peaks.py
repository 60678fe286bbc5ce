"""Measured peak GPU memory of real training steps next to the memory planner's figure, over a grid.

Stage 03 (4-bit nf4 LLaVA + LoRA, notebook 03's "load-4bit" and "lora" cells, random weights of the
profile's sizes): micro-batches of 4 / 8 / 16 rows of max_length tokens, gradient checkpointing on / off, the
memory-efficient (or flash) and the math SDPA kernel, the model's own loss over full logits and the course's
answer-only chunked loss. Stage 02 (bf16 LLM, projector trained): 16 x 83 tokens (cached features) and 16 x 512,
checkpointing on / off, both losses. Configurations the planner says cannot fit the GPU are skipped.

Each configuration runs one optimizer step of two accumulated micro-batches after a warm-up step (so AdamW's
states exist, as in every step but the first) and records ``torch.cuda.max_memory_allocated``:

* ``peak_first`` – the first micro-batch, no gradients yet (what a run without accumulation peaks at);
* ``peak_accum`` – the second micro-batch, the first one's gradients kept (what accumulation adds);
* ``peak_step`` – the optimizer step itself (AdamW's temporaries);

next to the planner's estimate without and with accumulation. Prints a table with the ratios; ``--json`` keeps it.

    python benchmarks/memory_peaks.py --size phi2 --json benchmarks/results/memory_peaks_h200.json   # ~2-3 min
    python benchmarks/memory_peaks.py                  # CPU: tiny sizes, the planner's figures only
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import traceback

import _common as C
import torch

GiB = 2 ** 30


def kernel_context(attention: str, device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if attention == "math":
        return sdpa_kernel([SDPBackend.MATH])
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def make_batch(profile, rows: int, length: int, answer_fraction: float, device, seed: int = 0):
    from helpers.data.encoding import PadCollator

    examples = C.synthetic_conversations(profile, [length] * rows, answer_fraction, seed=seed)
    batch = PadCollator(0)(examples)
    return {k: v.to(device) for k, v in batch.items()}


def one_micro_step(model, batch, loss_kind, num_items, dtype, device):
    from helpers.train.training import answer_only_loss, project_cached_features

    b = dict(batch)
    features = b.pop("vision_features")
    b["mm_encoder_outputs"] = project_cached_features(model, features)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        if loss_kind == "answer":
            loss, _ = answer_only_loss(model, b, num_items)
        else:
            loss = model(**b, use_cache=False, num_items_in_batch=num_items).loss
    loss.backward()


ANSWER_FRACTION = {"instruct": 0.55, "projection": 0.18}  # answer tokens of LLaVA-Instruct, of COCO captions


def measure(model, optimizer, profile, cfg, dtype, device, seed):
    """Peaks of one accumulated optimizer step (two micro-batches) for one configuration."""
    C.set_checkpointing(model, cfg["checkpointing"])
    model.train()
    batches = [make_batch(profile, cfg["batch"], cfg["tokens"], ANSWER_FRACTION[cfg["stage"]], device, seed + k)
               for k in range(2)]
    num_items = torch.tensor(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches), device=device)
    out = {}
    optimizer.zero_grad(set_to_none=True)
    with kernel_context(cfg["attention"], device):
        for key, batch in zip(("peak_first", "peak_accum"), batches):
            C.reset_peak(device)
            one_micro_step(model, batch, cfg["loss"], num_items, dtype, device)
            C.sync(device)
            out[key] = C.peak_gib(device)
    C.reset_peak(device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    C.sync(device)
    out["peak_step"] = C.peak_gib(device)
    del batches
    return out


def planned(profile, stage, cfg, memory_gpu):
    from helpers.planning.memory_plan import plan_memory

    kw = dict(gpu=memory_gpu, batch_size=cfg["batch"], seq_length=cfg["tokens"],
              gradient_checkpointing=cfg["checkpointing"], attention=cfg["attention"], loss=cfg["loss"])
    one = plan_memory(profile, stage, grad_accum=1, **kw)
    many = plan_memory(profile, stage, grad_accum=2, **kw)
    return {"planned_first": one.total_bytes / GiB, "planned_accum": many.total_bytes / GiB,
            "planned_phase": one.peak_phase, "fits": many.fits}


def grid(stage: str, size: str, quick: bool):
    configs = []
    if stage == "instruct":
        tokens = 1024 if size == "phi2" else 160
        shapes = [(4, True), (4, False), (8, True), (8, False), (16, True)]
        if quick:
            shapes = [(4, True), (8, False), (16, True)]
        for loss in ("model", "answer"):
            for attention in ("efficient", "math"):
                if quick and attention == "math" and loss == "answer":
                    continue
                for batch, ckpt in shapes:
                    configs.append(dict(stage=stage, batch=batch, tokens=tokens, checkpointing=ckpt,
                                        attention=attention, loss=loss))
    else:
        short = 83 if size == "phi2" else 32
        long = 512 if size == "phi2" else 128
        for loss in ("model", "answer"):
            for tokens, ckpt in ((short, True), (short, False), (long, True)):
                configs.append(dict(stage=stage, batch=16, tokens=tokens, checkpointing=ckpt, attention="efficient",
                                    loss=loss))
    return configs


def run_stage(stage, args, device, dtype, profile, deadline, memory_gpu, rows):
    """Build the stage's model once, then every configuration of the grid that the planner says fits."""
    configs = grid(stage, args.size, args.quick)
    plans = []
    for cfg in configs:
        try:
            plans.append(planned(profile, stage, cfg, memory_gpu))
        except Exception as exc:
            plans.append({"plan_error": f"{type(exc).__name__}: {exc}"})
    if device.type != "cuda" and not args.dry_run:
        rows += [{**cfg, **p, "note": "no CUDA: planned only"} for cfg, p in zip(configs, plans)]
        return
    if stage == "instruct":
        cache = os.path.join(args.cache_dir, f"{args.size}_random_llava")
        model, _, _ = C.random_4bit_llava(profile, device, cache, seed=args.seed)
    else:
        model, _, _ = C.random_llava(profile, device, dtype, seed=args.seed)
        model.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(True)
        model.model.multi_modal_projector.float()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    # warm-up: the smallest configuration, so AdamW's states exist from here on (as in every step but the first)
    try:
        measure(model, optimizer, profile, min(configs, key=lambda c: c["batch"] * c["tokens"]), dtype, device,
                args.seed)
    except Exception:
        traceback.print_exc()
    limit = C.gpu_memory(device).memory_gib if device.type == "cuda" else float("inf")
    order = sorted(range(len(configs)), key=lambda i: configs[i]["batch"] * configs[i]["tokens"]
                   * (1 if configs[i]["checkpointing"] else 4))
    for i in order:
        cfg, plan = configs[i], plans[i]
        row = {**cfg, **plan}
        if deadline.expired(reserve=10):
            row["note"] = "skipped: time limit"
        elif plan.get("planned_accum") and plan["planned_accum"] > 0.92 * limit:
            row["note"] = f"skipped: planned {plan['planned_accum']:.1f} GiB of {limit:.1f}"
        else:
            try:
                row.update(measure(model, optimizer, profile, cfg, dtype, device, args.seed))
                if plan.get("planned_first") and row.get("peak_first"):
                    row["ratio_first"] = plan["planned_first"] / row["peak_first"]
                    row["ratio_accum"] = plan["planned_accum"] / row["peak_accum"]
            except torch.OutOfMemoryError as exc:
                row["note"] = f"out of memory: {str(exc).splitlines()[0][:120]}"
            except Exception as exc:
                row["note"] = f"failed: {type(exc).__name__}: {exc}"[:200]
                traceback.print_exc()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None):
    parser = C.base_parser(__doc__.split("\n")[0])
    C.add_time_limit(parser, 240)
    parser.add_argument("--stages", default="instruct,projection")
    parser.add_argument("--quick", action="store_true", help="a smaller grid (about half)")
    parser.add_argument("--dry-run", action="store_true",
                        help="on a CPU, run every configuration's training step too (no peaks: checks the code)")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "mmphi_bench"),
                        help="where the random checkpoint is saved once and reused (shared with qlora_step.py)")
    args = parser.parse_args(argv)
    deadline, device = C.start(args, parser)
    profile = C.profile_for(args.size)
    dtype = C.precision(device)
    memory_gpu = C.gpu_memory(device) if device.type == "cuda" else "H200"
    info = C.machine(device)
    rows = []
    result = {"benchmark": "memory_peaks", "machine": info, "size": args.size, "rows": rows, "notes": []}
    for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
        if deadline.expired(reserve=20):
            result["notes"].append(f"stage {stage} skipped: time limit")
            continue
        try:
            run_stage(stage, args, device, dtype, profile, deadline, memory_gpu, rows)
        except Exception as exc:
            result["notes"].append(f"stage {stage} failed: {type(exc).__name__}: {exc}")
            traceback.print_exc()
    print(f"\nPeak memory of training steps vs the planner ({info['device']}, {info.get('gpu', info.get('cpu'))}), "
          f"size {args.size}; GiB; planned_first = no accumulation, planned_accum = gradients kept")
    columns = ["stage", "batch", "tokens", "checkpointing", "attention", "loss", "peak_first", "planned_first",
               "ratio_first", "peak_accum", "planned_accum", "ratio_accum", "peak_step", "planned_phase", "note"]
    print(C.table(rows, columns))
    measured = [r for r in rows if r.get("ratio_first")]
    if measured:
        lo = min(min(r["ratio_first"], r["ratio_accum"]) for r in measured)
        hi = max(max(r["ratio_first"], r["ratio_accum"]) for r in measured)
        result["ratio_range"] = [lo, hi]
        print(f"planned / measured: {lo:.3f} .. {hi:.3f} over {len(measured)} configurations "
              f"({'never below' if lo >= 1 else 'BELOW the measured peak somewhere'}; "
              f"{'within' if hi <= 1.10 else 'NOT within'} 10 %)")
    for n in result["notes"]:
        print(f"note: {n}")
    C.save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
