"""Stage 03 training speed, the old way vs the new way, on the same optimizer batches.

Both ways train the same 4-bit nf4 LLaVA + LoRA (notebook 03's "load-4bit" and "lora" cells, random weights
of the profile's sizes) on the same synthetic conversations (image placeholders, random text, answer spans,
cached vision features) with lengths drawn like LLaVA-Instruct's (``--lengths llava``, the default) or all at
max_length (``--lengths full``, the setting of the earlier H200 measurement). One optimizer step = the recipe's
effective batch (micro-batch x accumulation), bf16 autocast on a GPU, AdamW with the projector's own learning rate,
gradient clipping, as Trainer runs it:

* old : random micro-batches of the profile's batch size (4 in the full profile), gradient checkpointing as the
        profile says (on), the model's own loss over the full logits;
* new : the same optimizer batch cut into length-balanced micro-batches by transformers' BatchRebalanceSampler, the
        micro-batch chosen by ``helpers.planning.time_plan.recipe_for_gpu`` for this GPU (the largest the memory planner
        says fits, checkpointing only when needed), the answer-only chunked loss
        (``helpers.train.training.answer_only_loss``);
* fused (``--ways old,new,fused``; a GPU with ``liger-kernel``): the new way with the answer positions' LM head and
        cross-entropy in one fused kernel (liger's ``LigerFusedLinearCrossEntropyLoss``: no logits kept at all), at
        the new way's micro-batch or ``--fused-batch`` (the micro-batch the memory it frees allows).

It prints seconds per optimizer step, real and padded tokens per second, MFU (6 x LM parameters x real tokens over
the GPU's bf16 peak), the peak ``torch.cuda.max_memory_allocated`` next to the memory planner's figure for the
largest micro-batch of the run, the time planner's figure next to the measured step, and the loss of every step for
both ways (the same examples: the same loss up to bf16 rounding).

    python benchmarks/qlora_step.py                       # CPU: tiny sizes, a few seconds
    python benchmarks/qlora_step.py --size phi2 --json benchmarks/results/qlora_step_h200.json   # a GPU
"""
from __future__ import annotations

import math
import os
import tempfile
import traceback

import _common as C
import torch


def step_batches(indices, lengths, batch_size, grad_accum, balanced, seed):
    """Micro-batches (lists of example indices) of one optimizer batch."""
    if balanced and grad_accum > 1:
        from transformers.trainer_pt_utils import BatchRebalanceSampler

        local = [lengths[i] for i in indices]
        sampler = BatchRebalanceSampler(local, len(indices), 1, grad_accum, shuffle=False, seed=seed)
        return [[indices[j] for j in mb] for mb in sampler]
    g = torch.Generator().manual_seed(seed)
    order = [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def run_way(name, model, examples, steps_indices, way, device, dtype, profile, deadline, n_params, gpu_spec,
            memory_gpu, warmup=True):
    from helpers.data.encoding import PadCollator
    from helpers.planning.memory_plan import plan_memory
    from helpers.planning.time_plan import DataShape, plan_time
    from helpers.train.training import answer_only_loss, project_cached_features

    C.set_checkpointing(model, way["checkpointing"])
    model.train()
    collate = PadCollator(0)
    lengths = [len(e["input_ids"]) for e in examples]
    trainable = [p for p in model.parameters() if p.requires_grad]
    projector = [p for n, p in model.named_parameters() if p.requires_grad and "multi_modal_projector" in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "multi_modal_projector" not in n]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": 2e-4}, {"params": projector, "lr": 2e-5}])
    half = dtype in (torch.bfloat16, torch.float16)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=half)
    # fp16 (a T4, or MMPHI_PRECISION=fp16): a gradient scaler, as Trainer's fp16 mode uses; it skips non-finite steps
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    skipped_steps = []
    steps = []
    loss_sum = fused_cross_entropy_sum() if way["loss"] == "fused" else None  # built once per way
    all_micro = []

    def one_step(indices, seed):
        micro = step_batches(indices, lengths, way["batch_size"], way["grad_accum"], way["balanced"], seed)
        batches = [collate([examples[i] for i in mb]) for mb in micro]
        num_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        total_loss = 0.0
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            features = b.pop("vision_features")
            # as in the course: the projector runs outside autocast (accelerate wraps only model.forward)
            b["mm_encoder_outputs"] = project_cached_features(model, features)
            with autocast:
                if way["loss"] in ("answer", "fused"):
                    loss, _ = answer_only_loss(model, b, torch.tensor(num_items, device=device), loss_sum=loss_sum)
                else:
                    loss = model(**b, use_cache=False, num_items_in_batch=torch.tensor(num_items, device=device)).loss
            scaler.scale(loss).backward()
            total_loss += float(loss.detach())
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped_steps.append(scaler.is_enabled() and scaler.get_scale() < scale)
        optimizer.zero_grad(set_to_none=True)
        real = sum(len(examples[i]["input_ids"]) for i in indices)
        padded = sum(len(mb) * max(lengths[i] for i in mb) for mb in micro)
        return total_loss, real, padded, micro

    import time

    warm_loss = None
    if warmup:
        warm_loss, *_ = one_step(steps_indices[0], 0)  # allocations, AdamW states, kernels chosen
        C.sync(device)
    C.reset_peak(device)
    for k, indices in enumerate(steps_indices[1:], start=1):
        if deadline.expired(reserve=5) and steps:
            break
        C.sync(device)
        start = time.perf_counter()
        loss, real, padded, micro = one_step(indices, k)
        C.sync(device)
        seconds = time.perf_counter() - start
        steps.append({"seconds": seconds, "loss": loss, "real_tokens": real, "padded_tokens": padded,
                      "micro_batches": len(micro)})
        all_micro += micro
    if not steps:
        return {"way": name, **way, "error": "no step fitted the time limit"}
    seconds = sum(s["seconds"] for s in steps)
    real = sum(s["real_tokens"] for s in steps)
    padded = sum(s["padded_tokens"] for s in steps)
    out = {"way": name, **way, "steps_timed": len(steps), "s_per_step": seconds / len(steps),
           "real_tokens_per_s": real / seconds, "padded_tokens_per_s": padded / seconds,
           "padding_pct": 100 * (padded - real) / padded,
           "losses": ([warm_loss] if warm_loss is not None else []) + [s["loss"] for s in steps],
           "micro_batches_per_step": steps[0]["micro_batches"], "peak_gib": C.peak_gib(device),
           "precision": str(dtype).replace("torch.", ""), "skipped_steps": int(sum(skipped_steps)),
           "all_losses_finite": all(math.isfinite(x) for x in [warm_loss or 0.0] + [s["loss"] for s in steps])}
    if gpu_spec is not None and gpu_spec == C.gpu_key(device):  # MFU of the GPU that ran it (not of --as-gpu)
        from helpers.planning.time_plan import GPU_SPECS

        out["mfu_pct"] = 100 * 6 * n_params * out["real_tokens_per_s"] / (GPU_SPECS[gpu_spec].bf16_tflops * 1e12)
    # the planners, for the largest micro-batch this run made and for these settings
    largest = max(all_micro, key=lambda mb: len(mb) * max(lengths[i] for i in mb))
    rows, length = len(largest), max(lengths[i] for i in largest)
    try:
        # the planners know the chunked answer-only loss; the fused one holds less, so its plan is an upper bound
        mem = plan_memory(profile, "instruct", gpu=memory_gpu, batch_size=rows, seq_length=length,
                          gradient_checkpointing=way["checkpointing"], grad_accum=way["grad_accum"],
                          loss=planned_loss(way),
                          attention="efficient" if device.type == "cuda" and getattr(memory_gpu, "native_bf16", False)
                          else "auto")
        out["planned_peak_gib"] = mem.total_bytes / 2 ** 30
        out["planned_for"] = f"{rows} x {length}"
    except Exception as exc:  # a plan must not stop the measurement
        out["planned_peak_gib"] = None
        out["plan_error"] = f"{type(exc).__name__}: {exc}"
    if gpu_spec is not None:
        try:
            data = DataShape(tuple(lengths), way["answer_fraction"], "the benchmark's examples", measured=True)
            t = plan_time(profile, "instruct", gpu_spec, batch_size=way["batch_size"], grad_accum=way["grad_accum"],
                          gradient_checkpointing=way["checkpointing"], loss=planned_loss(way), balanced=way["balanced"],
                          data=data, n_examples=len(steps_indices[0]), max_steps=1)
            out["planned_s_per_step"] = t.step_seconds
        except Exception as exc:
            out["planned_s_per_step"] = None
            out["time_plan_error"] = f"{type(exc).__name__}: {exc}"
    del optimizer
    return out


def planned_loss(way) -> str:
    return "answer" if way["loss"] == "fused" else way["loss"]


def fused_cross_entropy_sum():
    """liger-kernel's fused linear cross-entropy as ``answer_only_loss``'s `loss_sum` (Triton: CUDA only). Its
    chunks compute the logits, their softmax gradient and the head's gradient in one pass and keep no logits."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as exc:
        raise RuntimeError(f"the fused way needs liger-kernel on a CUDA GPU ({exc})") from None
    fused = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def loss_sum(lm_head, hidden, targets):
        weight = lm_head.weight
        return fused(weight, hidden.to(weight.dtype), targets,
                     lm_head.bias.to(weight.dtype) if lm_head.bias is not None else None)

    return loss_sum


def choose_new_way(profile, device, effective, lengths, answer_fraction, gpu_spec, args):
    """The new way's micro-batch and checkpointing: recipe_for_gpu on a GPU in the table, else --new-batch."""
    batch, ckpt, why = args.new_batch, args.new_checkpointing, "from the command line"
    if batch is None and gpu_spec is not None and args.size == "phi2":
        from helpers.planning.time_plan import DataShape, recipe_for_gpu

        data = DataShape(tuple(lengths), answer_fraction, "the benchmark's examples", measured=True)
        recipe = recipe_for_gpu(profile, gpu_spec, data={"instruct": data})
        r = recipe.stages["instruct"]
        batch = r.batch_size
        if ckpt == "auto":
            ckpt = "on" if r.gradient_checkpointing else "off"
        why = f"recipe_for_gpu: {r.reason}"
    batch = batch or (8 if args.size == "tiny" else 4)
    while effective % batch:
        batch //= 2
    if ckpt == "auto":
        ckpt = "on" if (profile.gradient_checkpointing and device.type == "cuda") else "off"
    return batch, ckpt == "on", why


def main(argv=None):
    parser = C.base_parser(__doc__.split("\n")[0])
    C.add_time_limit(parser, 420)
    parser.add_argument("--lengths", choices=["llava", "full"], default="llava",
                        help="llava: lengths drawn like LLaVA-Instruct (helpers.planning.time_plan.assumed_data); "
                             "full: every example at max_length")
    parser.add_argument("--effective-batch", type=int, help="examples per optimizer step (default: the profile's "
                        "batch x accumulation; tiny: 16)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per way after one warm-up step "
                        "(default 2 on a GPU, 1 on a CPU)")
    parser.add_argument("--old-batch", type=int, help="the old way's micro-batch (default: the profile's)")
    parser.add_argument("--new-batch", type=int, help="the new way's micro-batch (default: recipe_for_gpu on a "
                        "GPU, 8 for tiny)")
    parser.add_argument("--new-checkpointing", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--fused-batch", type=int, help="the fused way's micro-batch (default: the new way's)")
    parser.add_argument("--ways", default="old,new", help="old, new, fused (comma-separated)")
    parser.add_argument("--as-gpu", help="plan and cap memory as on this GPU of helpers.planning.time_plan.GPU_SPECS "
                        "(e.g. T4): the new way takes that GPU's recipe, and the process may allocate only that GPU's "
                        "memory "
                        "(torch.cuda.set_per_process_memory_fraction). With MMPHI_PRECISION=fp16 this rehearses a "
                        "T4's fp16 path at real size on a bigger GPU (speed is this GPU's, not the T4's)")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "mmphi_bench"),
                        help="where the random checkpoint is saved once and reused")
    args = parser.parse_args(argv)
    deadline, device = C.start(args, parser)
    memory_cap = None
    if args.as_gpu:
        from helpers.planning.memory_plan import GPUS, gpu_by_name

        memory_cap = gpu_by_name(GPUS, args.as_gpu, "no memory figure for GPU").memory_gib
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
            torch.cuda.set_per_process_memory_fraction(min(1.0, memory_cap / total), torch.cuda.current_device())
    profile = C.profile_for(args.size)
    spec = profile.instruct
    effective = args.effective_batch or (spec.batch_size * spec.grad_accum if args.size == "phi2" else 16)
    n_steps = args.steps or (2 if device.type == "cuda" else 1)
    dtype = C.precision(device)
    info = C.machine(device)
    result = {"benchmark": "qlora_step", "machine": info, "size": args.size, "lengths": args.lengths,
              "effective_batch": effective, "ways": [], "notes": [], "as_gpu": args.as_gpu,
              "memory_cap_gib": memory_cap, "precision": str(dtype).replace("torch.", "")}
    try:
        from helpers.planning.time_plan import assumed_data, lm_parameters

        data = assumed_data(profile, "instruct")
        g = torch.Generator().manual_seed(args.seed)
        n = effective * (n_steps + 1)
        if args.lengths == "full":
            lengths = [spec.max_length] * n
        else:
            pool = list(data.lengths)
            lengths = [pool[i] for i in torch.randint(0, len(pool), (n,), generator=g).tolist()]
        answer_fraction = data.answer_fraction
        examples = C.synthetic_conversations(profile, lengths, answer_fraction, seed=args.seed)
        perm = torch.randperm(n, generator=g).tolist()
        steps_indices = [perm[i * effective:(i + 1) * effective] for i in range(n_steps + 1)]
        gpu_spec = args.as_gpu or C.gpu_key(device)
        memory_gpu = args.as_gpu or (C.gpu_memory(device) if device.type == "cuda" else "A100-80GB")
        n_params = lm_parameters(profile)
        cache = os.path.join(args.cache_dir, f"{args.size}_random_llava")
        model, _tok, _ = C.random_4bit_llava(profile, device, cache, seed=args.seed)
        if device.type == "cuda":
            result["weights_gib"] = torch.cuda.memory_allocated(device) / 2 ** 30
        start_weights = {n_: p.detach().clone() for n_, p in model.named_parameters() if p.requires_grad}
        old_batch = args.old_batch or (spec.batch_size if args.size == "phi2" else 4)
        while effective % old_batch:
            old_batch //= 2
        new_batch, new_ckpt, why = choose_new_way(profile, device, effective, lengths, answer_fraction, gpu_spec,
                                                  args)
        ways = {"old": dict(batch_size=old_batch, grad_accum=effective // old_batch,
                            checkpointing=bool(profile.gradient_checkpointing), loss="model", balanced=False,
                            answer_fraction=answer_fraction),
                "new": dict(batch_size=new_batch, grad_accum=effective // new_batch, checkpointing=new_ckpt,
                            loss="answer", balanced=True, answer_fraction=answer_fraction)}
        fused_batch = args.fused_batch or new_batch
        while effective % fused_batch:
            fused_batch //= 2
        ways["fused"] = dict(ways["new"], batch_size=fused_batch, grad_accum=max(1, effective // fused_batch),
                             loss="fused")
        result["new_way_chosen"] = why
        for name in [w.strip() for w in args.ways.split(",") if w.strip()]:
            if deadline.expired(reserve=20):
                result["notes"].append(f"way {name} skipped: time limit")
                continue
            try:
                with torch.no_grad():  # every way starts from the same weights
                    for n_, p in model.named_parameters():
                        if p.requires_grad:
                            p.copy_(start_weights[n_])
                result["ways"].append(run_way(name, model, examples, steps_indices, ways[name], device, dtype,
                                              profile, deadline, n_params, gpu_spec, memory_gpu))
            except Exception as exc:  # e.g. out of memory: record it, keep going
                result["ways"].append({"way": name, **ways[name], "error": f"{type(exc).__name__}: {exc}"})
                traceback.print_exc()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    report(result, info, args)
    C.save_json(args.json, result)
    return result


def same_losses(a, b, rel_tol=0.02, abs_tol=1e-3) -> bool:
    """Whether two ways' per-step losses agree: both non-empty, as many steps, each pair within 2 % (bf16 rounding
    on a GPU). Empty or unequal lists are not agreement (zip alone would compare nothing and say they agree)."""
    return (len(a) > 0 and len(a) == len(b)
            and all(math.isclose(x, y, rel_tol=rel_tol, abs_tol=abs_tol) for x, y in zip(a, b)))


def report(result, info, args):
    ways = [w for w in result["ways"] if "error" not in w]
    print(f"\nStage 03 step, old way vs new way ({info['device']}, {info.get('gpu', info.get('cpu'))}), size "
          f"{result['size']}, lengths {result['lengths']}, {result['effective_batch']} examples per optimizer step")
    if result.get("new_way_chosen"):
        print(f"new way: {result['new_way_chosen']}")
    columns = ["way", "batch_size", "grad_accum", "checkpointing", "loss", "s_per_step", "planned_s_per_step",
               "real_tokens_per_s", "padded_tokens_per_s", "padding_pct", "mfu_pct", "peak_gib", "planned_peak_gib"]
    if ways:
        print(C.table(ways, columns))
        for w in ways:
            print(f"{w['way']}: losses per step (warm-up first) {[round(x, 4) for x in w['losses']]}")
    for w in result["ways"]:
        if "error" in w:
            print(f"{w['way']}: FAILED {w['error']}")
    by = {w["way"]: w for w in ways}
    if "old" in by and "new" in by:
        speedup = by["old"]["s_per_step"] / by["new"]["s_per_step"]
        result["speedup"] = speedup
        same = same_losses(by["old"]["losses"], by["new"]["losses"])
        result["same_loss"] = same
        print(f"new / old: {speedup:.2f}x faster per optimizer step (same examples; losses "
              f"{'agree' if same else 'DIFFER'} within 2 %)")
    if "new" in by and "fused" in by:
        result["fused_speedup"] = by["new"]["s_per_step"] / by["fused"]["s_per_step"]
        result["fused_same_loss"] = same_losses(by["new"]["losses"], by["fused"]["losses"])
        print(f"fused / new: {result['fused_speedup']:.2f}x per optimizer step, peak {by['fused']['peak_gib']} vs "
              f"{by['new']['peak_gib']} GiB (losses {'agree' if result['fused_same_loss'] else 'DIFFER'} within 2 %)")
    for note in result["notes"]:
        print(f"note: {note}")
    if result.get("error"):
        print(f"FAILED: {result['error']}")


if __name__ == "__main__":
    main()
