"""Greedy answer generation, four ways side by side, warm-up included.

A randomly initialised LLaVA of the profile's sizes answers a batch of image + question prompts with greedy
decoding, exactly `--new-tokens` tokens each (min_new_tokens = max_new_tokens, so EOS cannot end it early):

* ``kv cache`` – ``model.generate`` with the dynamic KV cache (what the course did before);
* ``no cache`` – ``model.generate(use_cache=False)``: the whole sequence recomputed for every token;
* ``static``   – ``model.generate(cache_implementation="static")``: transformers' stock static cache (on a GPU it
  compiles the forward itself on the first call);
* ``fast``     – ``helpers.models.fast_generation.FastGreedy``: static cache + the one-token step compiled as a CUDA
graph
  (transformers' documented custom-loop path), what the demo and the evaluation use on a GPU.

Each way's first call (compilation for ``static`` and ``fast`` on a GPU) is timed apart as its warm-up, then
`--repeats` calls are timed in turns. Every way's tokens are compared with the ``kv cache`` way's (identical in fp32;
in bf16 a different attention shape can flip a near-tie).

    python benchmarks/generation_kv_cache.py                 # CPU here: tiny profile sizes
    python benchmarks/generation_kv_cache.py --size phi2 --json benchmarks/results/generation_h200.json   # a GPU
"""
from __future__ import annotations

import time
import traceback

import _common as C
import torch

WAYS = ["kv cache", "fast", "static", "no cache"]


def prompts(model, profile, batch_size: int, question_tokens: int, device):
    """`USER:` + image placeholders + a question + `ASSISTANT:`, as LlavaProcessor expands the chat template."""
    config = model.config
    g = torch.Generator().manual_seed(1)
    n_img = profile.image_seq_length
    ids = torch.randint(2, min(300, config.text_config.vocab_size), (batch_size, 2 + n_img + question_tokens),
                        generator=g)
    ids[:, 2:2 + n_img] = config.image_token_id
    size = profile.vision.image_size
    pixels = torch.randn(batch_size, 3, size, size, generator=g)
    return ids.to(device), torch.ones_like(ids).to(device), pixels.to(device)


def make_way(name, model, tok, ids, mask, pixels, n, backend="inductor"):
    common = dict(max_new_tokens=n, min_new_tokens=n, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if name == "fast":
        from helpers.models.fast_generation import FastGreedy, cache_length_bucket

        context = model.config.text_config.max_position_embeddings
        gen = FastGreedy(model, batch_size=ids.shape[0], max_cache_len=cache_length_bucket(ids.shape[1] + n, context),
                         backend=backend)
        return lambda: gen.generate(ids, mask, pixels, **common)
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False, **common)
    if name == "no cache":
        kwargs["use_cache"] = False
    elif name == "static":
        kwargs["cache_implementation"] = "static"
    return lambda: model.generate(**kwargs)


def run_batch(model, tok, profile, device, batch_size: int, args, deadline) -> dict:
    ids, mask, pixels = prompts(model, profile, batch_size, args.question_tokens, device)
    pixels = pixels.to(next(model.model.vision_tower.parameters()).dtype)
    n = args.new_tokens
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    if args.static_max_batch is not None and batch_size > args.static_max_batch:
        ways = [w for w in ways if w != "static"]  # its compilation is the same cost again for every batch size
    outputs, fns, rows, notes = {}, {}, [], []
    for name in ways:
        if deadline.expired(reserve=15):
            notes.append(f"batch {batch_size}: {name} skipped (time limit)")
            continue
        try:
            fn = make_way(name, model, tok, ids, mask, pixels, n, args.fast_backend)
            C.reset_peak(device)
            start = time.perf_counter()
            with torch.no_grad():
                outputs[name] = fn()
            C.sync(device)
            warm = time.perf_counter() - start
            fns[name] = (fn, warm, C.peak_gib(device))
        except Exception as exc:
            notes.append(f"batch {batch_size}: {name} failed: {type(exc).__name__}: {exc}"[:300])
            traceback.print_exc()
            if name == "fast" and args.fast_backend == "inductor" and device.type == "cuda" \
                    and not deadline.expired(reserve=30):
                try:  # CUDA graphs without inductor's code generation (no compiler needed)
                    torch._dynamo.reset()
                    fn = make_way(name, model, tok, ids, mask, pixels, n, "cudagraphs")
                    start = time.perf_counter()
                    with torch.no_grad():
                        outputs[name] = fn()
                    C.sync(device)
                    fns[name] = (fn, time.perf_counter() - start, C.peak_gib(device))
                    notes.append(f"batch {batch_size}: fast ran with torch.compile(backend='cudagraphs') instead")
                except Exception as exc2:
                    notes.append(f"batch {batch_size}: fast (cudagraphs) failed too: {type(exc2).__name__}: "
                                 f"{exc2}"[:300])
    timings = {}
    for name, (fn, _, _) in fns.items():
        timings[name] = {"wall": [], "cpu": []}
    for _ in range(args.repeats):
        for name, (fn, _, _) in fns.items():
            if deadline.expired(reserve=5) and timings[name]["wall"]:
                continue
            wall, cpu = time.perf_counter(), time.process_time()
            with torch.no_grad():
                fn()
            C.sync(device)
            timings[name]["wall"].append(time.perf_counter() - wall)
            timings[name]["cpu"].append(time.process_time() - cpu)
    reference = outputs.get("kv cache")
    for name, (fn, warm, peak) in fns.items():
        walls = timings[name]["wall"] or [warm]
        wall = C.median(walls)
        new = outputs[name][:, ids.shape[1]:]
        rows.append({"batch": batch_size, "way": name, "first_call_s": warm, "median_s": wall,
                     "tokens_per_s": batch_size * n / wall, "timed_runs": len(timings[name]["wall"]),
                     "cpu_s": C.median(timings[name]["cpu"]) if device.type == "cpu" and timings[name]["cpu"]
                     else None, "peak_gib": peak, "exactly_n_tokens": new.shape[1] == n,
                     "same_tokens_as_kv_cache": None if reference is None else
                     bool(torch.equal(outputs[name], reference))})
    by = {r["way"]: r for r in rows}
    ratios = {f"{w} / kv cache": by[w]["tokens_per_s"] / by["kv cache"]["tokens_per_s"]
              for w in by if w != "kv cache" and "kv cache" in by}
    return {"batch_size": batch_size, "prompt_tokens": ids.shape[1], "rows": rows, "ratios": ratios, "notes": notes}


def main(argv=None):
    parser = C.base_parser(__doc__.split("\n")[0])
    C.add_time_limit(parser, 360)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 16],
                        help="prompts answered together; several values run one after the other (default: 1 = a "
                             "chat turn, 16 = batched held-out evaluation)")
    parser.add_argument("--question-tokens", type=int, default=24)
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, in order of priority: {WAYS}")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per way (default 2 on CPU, 3 on GPU)")
    parser.add_argument("--static-max-batch", type=int, default=None,
                        help="run the stock static way only up to this batch size (each size compiles anew)")
    parser.add_argument("--fast-backend", default="inductor", help="torch.compile backend of the fast way "
                        "(inductor = mode reduce-overhead, CUDA graphs; cudagraphs = CUDA graphs without codegen)")
    args = parser.parse_args(argv)
    deadline, device = C.start(args, parser)
    args.repeats = args.repeats or (3 if device.type == "cuda" else 2)
    profile = C.profile_for(args.size)
    dtype = C.precision(device)
    info = C.machine(device)
    info["load"] = C.load_note()
    results, notes = [], []
    try:
        model, tok, profile = C.random_llava(profile, device, dtype, seed=args.seed)
        model.eval()
        for b in args.batch_size:
            if deadline.expired(reserve=20):
                notes.append(f"batch {b} skipped: time limit")
                continue
            results.append(run_batch(model, tok, profile, device, b, args, deadline))
    except Exception as exc:
        notes.append(f"failed: {type(exc).__name__}: {exc}")
        traceback.print_exc()

    print(f"\nGreedy generation of {args.new_tokens} new tokens ({info['device']}, "
          f"{info.get('gpu', info.get('cpu'))}, {info['cpu_threads']} threads) {info['load']}")
    if results:
        print(f"LM {profile.phi.num_hidden_layers} layers x {profile.phi.hidden_size} ({str(dtype)[6:]}), "
              f"prompt {results[0]['prompt_tokens']} tokens ({profile.image_seq_length} image tokens)")
        print(C.table([row for r in results for row in r["rows"]],
                      ["batch", "way", "first_call_s", "median_s", "tokens_per_s", "timed_runs", "cpu_s", "peak_gib",
                       "same_tokens_as_kv_cache"]))
        for r in results:
            print(f"batch {r['batch_size']:>3}: " + ", ".join(f"{k} = {v:.2f}x" for k, v in r["ratios"].items()))
            notes += r["notes"]
    for n in notes:
        print(f"note: {n}")
    C.save_json(args.json, {"benchmark": "generation_kv_cache", "machine": info, "size": args.size,
                            "dtype": str(dtype), "new_tokens": args.new_tokens, "results": results, "notes": notes})
    return results


if __name__ == "__main__":
    main()
