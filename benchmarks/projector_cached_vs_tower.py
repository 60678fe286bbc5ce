"""Stage 02 training step: projector fed from cached vision features vs running the vision tower every step.

Both ways train the same randomly initialised LLaVA (Phi LM + CLIP ViT tower + 2-layer projector, assembled by
helpers.models.modeling.assemble_llava): projector-only trainable, frozen LM and tower, AdamW, one forward + loss +
backward + optimizer step per batch of identical token ids.

* cached : vision features computed once beforehand; each step runs helpers.train.training.project_cached_features
           and the stock LLaVA forward with ``mm_encoder_outputs`` (what the course does);
* tower  : each step passes ``pixel_values`` and LLaVA runs the CLIP tower itself (what earlier attempts did).

Which tower: ``--tower profile`` uses the profile's own tower (tiny: 64 px / patch 16 / 3 layers x 64 wide, so the
tower is a small part of a step); ``--tower clip-b32`` uses a full-size CLIP ViT-B/32 at 224 px (random weights),
which is the tower the full profile runs; ``--tower both`` (the default) measures both pairs.

    python benchmarks/projector_cached_vs_tower.py                      # CPU here, tiny LM, both towers
    python benchmarks/projector_cached_vs_tower.py --size phi2          # on a GPU: Phi-2-sized LM, ViT-B/32

On a GPU it also reports torch.cuda.max_memory_allocated() per way and, for --size phi2, the planner's estimate
(helpers.planning.memory_plan) for the same batch, so the plan can be checked against a measurement.
"""
from __future__ import annotations

import _common as C
import torch


def make_batch(model, profile, batch_size: int, text_tokens: int, device):
    """Token ids `USER:` + image placeholders + text; labels on the text only (as the course's captions)."""
    config = model.config
    n_img = profile.image_seq_length
    length = 2 + n_img + text_tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, min(300, config.text_config.vocab_size), (batch_size, length), generator=g)
    ids[:, 2:2 + n_img] = config.image_token_id
    labels = ids.clone()
    labels[:, : 2 + n_img] = -100
    mask = torch.ones_like(ids)
    image_size = profile.vision.image_size
    pixels = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    return ids.to(device), mask.to(device), labels.to(device), pixels.to(device)


def benchmark_pair(size: str, tower_kind: str, device, batch_size: int, text_tokens: int, steps: int,
                   checkpointing: bool, seed: int) -> dict:
    from helpers.config import FULL
    from helpers.models.modeling import vision_features
    from helpers.train.training import project_cached_features

    profile = C.profile_for(size)
    vision = FULL.vision if tower_kind == "clip-b32" else None
    lm_dtype = C.precision(device)
    model, tok, profile = C.random_llava(profile, device, lm_dtype, seed=seed, vision=vision)
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW(projector.parameters(), lr=1e-4)
    ids, mask, labels, pixels = make_batch(model, profile, batch_size, text_tokens, device)
    tower = model.model.vision_tower
    with torch.no_grad():  # the cache: computed once, like helpers.models.vision.cache_features
        features = vision_features(tower, pixels.to(next(tower.parameters()).dtype), profile.vision_feature_layer)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=lm_dtype == torch.bfloat16)

    def step_cached():
        with autocast:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False,
                         mm_encoder_outputs=project_cached_features(model, features)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step_tower():
        with autocast:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels,
                         use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # peak memory of each way on its own, then both timed in turns
    peaks = {"cached": None, "tower": None}
    if device.type == "cuda":  # peak memory of each way on its own
        for way, fn in (("cached", step_cached), ("tower", step_tower)):
            C.reset_peak(device)
            fn()
            C.sync(device)
            peaks[way] = C.peak_gib(device)
    timings = C.time_interleaved({"cached": step_cached, "tower": step_tower}, device, repeats=steps, warmup=1)
    rows = []
    for way in ("cached", "tower"):
        wall, cpu = C.median(timings[way]["wall"]), C.median(timings[way]["cpu"])
        rows.append({"way": way, "median_step_s": wall, "samples_per_s": batch_size / wall,
                     "cpu_s_per_step": cpu if device.type == "cpu" else None,
                     "samples_per_cpu_s": batch_size / cpu if device.type == "cpu" else None,
                     "peak_gib": peaks[way], "steps": steps})
    ratio = rows[0]["samples_per_s"] / rows[1]["samples_per_s"]
    cpu_ratio = (rows[0]["samples_per_cpu_s"] / rows[1]["samples_per_cpu_s"]) if device.type == "cpu" else None
    v = profile.vision
    result = {"size": size, "tower": tower_kind, "lm_dtype": str(lm_dtype).replace("torch.", ""),
              "gradient_checkpointing": checkpointing, "batch_size": batch_size, "sequence_length": ids.shape[1],
              "image_tokens": profile.image_seq_length,
              "vision_tower": f"{v.image_size}px/patch{v.patch_size}, {v.num_hidden_layers} layers x {v.hidden_size}",
              "lm": f"{profile.phi.num_hidden_layers} layers x {profile.phi.hidden_size}, vocab {profile.phi.vocab_size}",
              "parameters": sum(p.numel() for p in model.parameters()), "rows": rows,
              "cached_speedup": ratio, "cached_speedup_cpu_time": cpu_ratio}
    if device.type == "cuda" and size == "phi2":
        result["memory_plan"] = planned_peak(profile, device, batch_size, ids.shape[1], checkpointing)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def planned_peak(profile, device, batch_size, seq_length, checkpointing) -> dict:
    """The planner's estimate for this very step (the benchmark's model has no fp32 copy of anything else)."""
    from helpers.planning.memory_plan import GPU, plan_memory

    props = torch.cuda.get_device_properties(device)
    gpu = GPU(props.name, props.total_memory / 2 ** 30, native_bf16=props.major >= 8)
    plan = plan_memory(profile, "projection", gpu=gpu, batch_size=batch_size, seq_length=seq_length,
                       gradient_checkpointing=checkpointing,
                       precision="bf16" if C.precision(device) == torch.bfloat16 else "fp32")
    return {"planned_peak_gib": plan.total_bytes / 2 ** 30, "fits": plan.fits}


def main(argv=None):
    parser = C.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--tower", choices=["both", "profile", "clip-b32"], default="both")
    parser.add_argument("--batch-size", type=int, help="default: the profile's stage-02 batch size")
    parser.add_argument("--text-tokens", type=int, default=32, help="caption tokens after the image (default 32)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per way (default 5 on CPU, 20 on GPU)")
    parser.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
                        help="auto: the profile's setting (tiny off, full on)")
    args = parser.parse_args(argv)
    device = C.pick_device(args.device)
    C.setup_threads(device, args.threads)
    profile = C.profile_for(args.size)
    if args.size == "phi2" and device.type == "cpu":
        parser.error("--size phi2 needs a GPU (a 2.7B-parameter step takes minutes on a CPU)")
    batch_size = args.batch_size or profile.projection.batch_size
    steps = args.steps or (20 if device.type == "cuda" else 3)
    ckpt = {"auto": profile.gradient_checkpointing, "on": True, "off": False}[args.gradient_checkpointing]
    towers = ["profile", "clip-b32"] if args.tower == "both" else [args.tower]
    if args.size == "phi2":
        towers = ["clip-b32"]  # the profile's tower is ViT-B/32 already
    results = [benchmark_pair(args.size, t, device, batch_size, args.text_tokens, steps, ckpt, args.seed)
               for t in towers]

    info = C.machine(device)
    info["load"] = C.load_note()
    print(f"\nProjector training step, cached features vs vision tower every step ({info['device']}, "
          f"{info.get('gpu', info.get('cpu'))}, {info['cpu_threads']} threads) {info['load']}")
    for r in results:
        print(f"\nLM {r['lm']} ({r['lm_dtype']}), tower {r['vision_tower']}, batch {r['batch_size']} x "
              f"{r['sequence_length']} tokens ({r['image_tokens']} image tokens), "
              f"gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'}")
        print(C.table(r["rows"], ["way", "median_step_s", "samples_per_s", "cpu_s_per_step", "samples_per_cpu_s",
                                  "peak_gib"]))
        print(f"cached / tower throughput: {r['cached_speedup']:.2f}x (wall clock)"
              + (f", {r['cached_speedup_cpu_time']:.2f}x (CPU time)" if r["cached_speedup_cpu_time"] else ""))
        if "memory_plan" in r:
            print(f"memory planner estimate for this step: {r['memory_plan']['planned_peak_gib']:.2f} GiB "
                  f"(measured peak, cached way: {r['rows'][0]['peak_gib']:.2f} GiB)")
    C.save_json(args.json, {"benchmark": "projector_cached_vs_tower", "machine": info, "results": results})
    return results


if __name__ == "__main__":
    main()
