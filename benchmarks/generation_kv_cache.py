"""Answer generation with the KV cache (what helpers.inference does) vs recomputing the whole sequence every token.

A randomly initialised LLaVA of the profile's sizes answers a batch of image + question prompts with greedy
decoding, exactly `--new-tokens` tokens each (min_new_tokens = max_new_tokens, so EOS cannot end it early), once
with ``use_cache=True`` and once with ``use_cache=False``; both runs must produce the same tokens.

    python benchmarks/generation_kv_cache.py                 # CPU here: tiny profile sizes
    python benchmarks/generation_kv_cache.py --size phi2     # on a GPU: Phi-2 / ViT-B/32 sizes, bf16
"""
from __future__ import annotations

import _common as C
import torch


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


def run_batch(model, tok, profile, device, batch_size: int, args) -> dict:
    ids, mask, pixels = prompts(model, profile, batch_size, args.question_tokens, device)
    pixels = pixels.to(next(model.model.vision_tower.parameters()).dtype)
    n = args.new_tokens
    outputs = {}

    def generate(use_cache: bool):
        def run():
            with torch.no_grad():
                outputs[use_cache] = model.generate(
                    input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False, use_cache=use_cache,
                    max_new_tokens=n, min_new_tokens=n, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return run

    peaks = {True: None, False: None}
    if device.type == "cuda":  # peak memory of each way on its own (and a warm-up)
        for use_cache in (True, False):
            C.reset_peak(device)
            generate(use_cache)()
            C.sync(device)
            peaks[use_cache] = C.peak_gib(device)
    timings = C.time_interleaved({"kv cache": generate(True), "no cache": generate(False)}, device,
                                 repeats=args.repeats, warmup=0)
    new = {k: v[:, ids.shape[1]:] for k, v in outputs.items()}
    assert all(t.shape[1] == n for t in new.values()), "generation did not produce exactly --new-tokens tokens"
    rows = []
    for way, use_cache in (("kv cache", True), ("no cache", False)):
        wall, cpu = C.median(timings[way]["wall"]), C.median(timings[way]["cpu"])
        rows.append({"batch": batch_size, "way": way, "median_s": wall, "tokens_per_s": batch_size * n / wall,
                     "cpu_s": cpu if device.type == "cpu" else None, "peak_gib": peaks[use_cache]})
    return {"batch_size": batch_size, "prompt_tokens": ids.shape[1], "rows": rows,
            "speedup": rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"],
            "speedup_cpu_time": rows[1]["cpu_s"] / rows[0]["cpu_s"] if device.type == "cpu" else None,
            "identical_tokens": bool(torch.equal(new[True], new[False]))}


def main(argv=None):
    parser = C.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 16],
                        help="prompts answered together; several values run one after the other (default: 1 = a "
                             "chat turn, 16 = batched held-out evaluation)")
    parser.add_argument("--question-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per way (default 2 on CPU, 5 on GPU)")
    args = parser.parse_args(argv)
    device = C.pick_device(args.device)
    C.setup_threads(device, args.threads)
    if args.size == "phi2" and device.type == "cpu":
        parser.error("--size phi2 needs a GPU")
    args.repeats = args.repeats or (5 if device.type == "cuda" else 2)
    profile = C.profile_for(args.size)
    dtype = C.precision(device)
    model, tok, profile = C.random_llava(profile, device, dtype, seed=args.seed)
    model.eval()
    results = [run_batch(model, tok, profile, device, b, args) for b in args.batch_size]

    info = C.machine(device)
    info["load"] = C.load_note()
    print(f"\nGreedy generation of {args.new_tokens} new tokens, KV cache vs none ({info['device']}, "
          f"{info.get('gpu', info.get('cpu'))}, {info['cpu_threads']} threads) {info['load']}")
    print(f"LM {profile.phi.num_hidden_layers} layers x {profile.phi.hidden_size} ({str(dtype)[6:]}), "
          f"prompt {results[0]['prompt_tokens']} tokens ({profile.image_seq_length} image tokens)")
    print(C.table([row for r in results for row in r["rows"]],
                  ["batch", "way", "median_s", "tokens_per_s", "cpu_s", "peak_gib"]))
    for r in results:
        print(f"batch {r['batch_size']:>3}: KV cache / no cache = {r['speedup']:.2f}x tokens per second"
              + (f" ({r['speedup_cpu_time']:.2f}x in CPU time)" if r["speedup_cpu_time"] else "")
              + f"; identical tokens: {'yes' if r['identical_tokens'] else 'NO'}")
    C.save_json(args.json, {"benchmark": "generation_kv_cache", "machine": info, "size": args.size,
                            "dtype": str(dtype), "new_tokens": args.new_tokens, "results": results})
    return results


if __name__ == "__main__":
    main()
