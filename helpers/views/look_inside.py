"""Look inside each stage: small views of the real objects a run uses, for the notebooks' "look inside" cells.

Each function takes objects the notebook already has (a tokenizer, a model, a record), prints or draws something
short, and returns the numbers it showed so a test can check them. Nothing here trains or changes a model.
"""
from __future__ import annotations

import html
from pathlib import Path

import torch
from PIL import Image

from helpers.data.chat_template import prompt_for_next_answer
from helpers.data.encoding import encode_conversation
from helpers.data.tokenizer import image_token_id
from helpers.models.modeling import vision_features
from helpers.train.pretrain import pack_documents
from helpers.train.training import _llava_of, project_cached_features
from helpers.views.reporting import save_and_show, show_table

# ----------------------------------------------------------------------------------------------- 01: text


def token_table(tok, text: str) -> list[dict]:
    """The tokens of `text` with their ids (one row per token), shown as a table."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rows = [{"position": i, "token": repr(tok.convert_ids_to_tokens(t)), "id": t,
             "text": repr(tok.decode([t]))} for i, t in enumerate(ids)]
    show_table(rows, ["position", "token", "text", "id"], max_rows=40)
    return rows


def show_packing(tok, documents: list[str], block_size: int) -> dict:
    """`pretrain.pack_documents` on a few documents: which document each position holds, and the mask."""
    ids, mask = pack_documents(tok, documents, block_size)
    lengths = [len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in documents]  # + EOS
    width = ids.shape[1]  # block_size, or less when even the fullest block is shorter
    print(f"{len(documents)} documents of {lengths} tokens (each closed by EOS) -> {ids.shape[0]} block(s) of "
          f"{width} tokens (at most {block_size}); real tokens per block {mask.sum(1).tolist()}, the rest is "
          "padding (mask 0)")
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        print(f"block {b}: ids {ids[b, :8].tolist()} ... {ids[b, n - 3:n].tolist()} | padding {width - n} "
              f"x id {tok.pad_token_id} (= EOS: found by the mask, never by id)")
    return {"blocks": ids.shape[0], "real_tokens": mask.sum(1).tolist(), "lengths": lengths}


def plot_batch_mask(mask: torch.Tensor, title: str = "attention mask of one batch", path=None):
    """An image of a batch's attention mask: rows are examples, columns positions (dark = a real token)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, max(1.2, 0.18 * mask.shape[0])))
    ax.imshow(mask.numpy(), aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    ax.set_xlabel("position in the block")
    ax.set_ylabel("example")
    ax.set_title(title)
    save_and_show(fig, path)
    return fig


# ---------------------------------------------------------------------------------------------- 02: image


def image_journey(model, processor, image, layer: int, prompt: str) -> dict:
    """One image through the model: pixels -> patches -> CLIP features -> projector -> the <image> placeholders it
    replaces in the prompt. Prints each shape and returns them."""
    llava = _llava_of(model)
    tower = llava.model.vision_tower
    device = next(tower.parameters()).device
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    size, patch = tower.config.image_size, tower.config.patch_size
    grid = size // patch
    with torch.no_grad():
        feats = vision_features(tower, pixels.to(device, next(tower.parameters()).dtype), layer)
        projected = project_cached_features(model, feats.float())["image"].pooler_output[0]
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    n_placeholders = int((inputs["input_ids"] == llava.config.image_token_id).sum())
    shapes = {"pixels": tuple(pixels.shape), "patches": (grid * grid, 3 * patch * patch),
              "features": tuple(feats.shape), "projected": tuple(projected.shape),
              "placeholders": n_placeholders, "prompt_tokens": int(inputs["input_ids"].shape[1])}
    print(f"pixels              {shapes['pixels']}  (CLIP's preprocessing: resize, centre crop, normalise)")
    print(f"patches             {grid} x {grid} = {grid * grid} of {patch} x {patch} pixels x 3 colours")
    print(f"CLIP features       {shapes['features']}  (layer {layer}, the CLS token dropped)")
    print(f"projector output    {shapes['projected']}  (one vector per patch, in the LLM's embedding width)")
    print(f"prompt              '<image>' expands to {n_placeholders} placeholder tokens, "
          f"{shapes['prompt_tokens']} tokens in all; the projected vectors replace the placeholders' embeddings")
    return shapes


def projector_summary(model) -> dict:
    """The projector's layers and parameter count."""
    projector = _llava_of(model).model.multi_modal_projector
    rows = [{"layer": name, "shape": tuple(p.shape), "parameters": p.numel()}
            for name, p in projector.named_parameters()]
    print(projector)
    show_table(rows)
    total = sum(r["parameters"] for r in rows)
    print(f"{total:,} parameters: the only ones stage 02 trains")
    return {"parameters": total, "layers": rows}


def feature_cache_saving(metrics: dict) -> dict:
    """What caching the frozen tower's features saved in this run, from its own measurements: the tower's time per
    image while caching, times the examples the projector saw (each of which would have run the tower again)."""
    seconds, images = metrics.get("feature_cache_seconds", 0.0), max(1, metrics.get("n_feature_images", 1))
    per_image = seconds / images
    seen = metrics.get("examples_seen", 0)
    avoided = per_image * seen
    print(f"caching: the frozen tower ran once per image ({images:,} images in {seconds:.1f} s, "
          f"{1000 * per_image:.1f} ms "
          f"each, JPEG decoding included). Training saw {seen:,} examples; running the tower for each would have "
          f"cost about {avoided:.1f} s more in this run ({avoided / max(seconds, 1e-9):.1f}x the caching), and again "
          "on every rerun.")
    return {"per_image_seconds": per_image, "examples_seen": seen, "avoided_seconds": avoided}


# -------------------------------------------------------------------------------------------- 03: training


def label_mask_html(tok, input_ids: list[int], labels: list[int], image_token_id: int | None = None) -> str:
    """The tokens of one encoded conversation, coloured: green = a loss target, grey = ignored (-100)."""
    spans, image_run = [], 0
    for i, (t, label) in enumerate(zip(input_ids, labels)):
        if image_token_id is not None and t == image_token_id:
            image_run += 1
            nxt = input_ids[i + 1] if i + 1 < len(input_ids) else None
            if nxt != image_token_id:
                spans.append(f'<span style="background:#ddd;color:#666">[{image_run} image tokens]</span>')
                image_run = 0
            continue
        text = html.escape(tok.decode([t]))
        style = "background:#b7e4a8" if label != -100 else "background:#eee;color:#777"
        spans.append(f'<span style="{style}">{text}</span>')
    legend = ('<div style="margin-top:4px;font-size:90%"><span style="background:#b7e4a8">loss target</span> '
              '<span style="background:#eee;color:#777">ignored (label -100)</span></div>')
    return ('<div style="font-family:monospace;white-space:pre-wrap;line-height:1.6">' + "".join(spans)
            + "</div>" + legend)


def show_label_mask(tok, messages: list[dict], image_seq_length: int) -> dict:
    """Render one conversation as training sees it, with the loss tokens marked; returns the counts."""
    enc = encode_conversation(tok, messages, image_seq_length)
    targets = sum(label != -100 for label in enc["labels"])
    try:
        from IPython.display import HTML, display

        display(HTML(label_mask_html(tok, enc["input_ids"], enc["labels"], image_token_id(tok))))
    except ImportError:  # pragma: no cover
        pass
    print(f"{len(enc['input_ids'])} tokens, {targets} of them loss targets (the answers and the EOS closing each)")
    return {"tokens": len(enc["input_ids"]), "targets": targets}


def lora_report(model) -> dict:
    """Which modules carry LoRA adapters and the trainable share of the parameters (see :func:`show_lora`)."""
    from collections import Counter

    kinds = Counter(name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")
                    and "language_model" in name)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return {"targets": dict(sorted(kinds.items())), "trainable": trainable, "total": total, "lora": lora}


def show_lora(report: dict) -> None:
    show_table([{"module": k, "adapted layers": v} for k, v in report["targets"].items()])
    print(f"trainable: {report['trainable']:,} of {report['total']:,} parameters "
          f"({report['trainable'] / report['total']:.2%}): LoRA {report['lora']:,} + the projector's full-precision "
          f"copy {report['trainable'] - report['lora']:,}")


def nf4_layer_report(model) -> dict:
    """The bytes of one 4-bit nf4 weight as bitsandbytes stores it, and of the same weight in bf16."""
    import bitsandbytes as bnb

    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit))
    weight = layer.weight
    state = weight.quant_state
    numel = layer.in_features * layer.out_features
    nf4 = weight.numel() * weight.element_size() + state.absmax.numel() * state.absmax.element_size()
    if getattr(state, "state2", None) is not None:
        nf4 += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return {"layer": name, "shape": (layer.out_features, layer.in_features), "weights": numel, "nf4_bytes": nf4,
            "bf16_bytes": numel * 2}


def show_nf4(report: dict) -> None:
    out_features, in_features = report["shape"]
    print(f"{report['layer']}: {out_features} x {in_features} = {report['weights']:,} weights -> nf4 "
          f"{report['nf4_bytes']:,} bytes ({8 * report['nf4_bytes'] / report['weights']:.2f} bits per weight) vs "
          f"bf16 {report['bf16_bytes']:,} bytes: {report['bf16_bytes'] / report['nf4_bytes']:.1f}x smaller")


def show_checkpoint_answers(rows: list[dict]) -> None:
    """The answers to the same held-out questions at every checkpoint of stage 03 (from its training callback)."""
    if not rows:
        print("no checkpoint was saved in this run (save_steps = 0, or a finished run was loaded)")
        return
    show_table(rows, ["step", "question", "expected", "answer"], max_rows=40)


@torch.no_grad()
def image_attention(model, processor, image, prompt: str) -> torch.Tensor:
    """Where the model looks when it starts to answer: the attention of the prompt's last position (the one that
    predicts the answer's first token) on each image token, averaged over heads and layers, laid out as the
    image's patch grid. The grid's sum is the share of that position's attention spent on the image."""
    llava = _llava_of(model)
    if llava.dtype == torch.float16:  # eager attention materialises Phi's scores in fp16, where they overflow
        raise ValueError("image_attention needs the model in fp32 or bf16: Phi's eager attention scores overflow in "
                         "fp16 (helpers.models.precision)")
    device = next(llava.parameters()).device
    inputs = processor(images=[image], text=[prompt], return_tensors="pt").to(device)
    previous = llava.config._attn_implementation
    llava.set_attn_implementation("eager")  # attention weights are only materialised by the eager kernel
    try:
        attentions = llava(**inputs, output_attentions=True).attentions
    finally:
        llava.set_attn_implementation(previous)
    last = torch.stack([a[0, :, -1, :].float() for a in attentions]).mean(dim=(0, 1))  # layers, heads -> keys
    on_image = last[inputs["input_ids"][0] == llava.config.image_token_id].cpu()
    grid = int(round(on_image.numel() ** 0.5))
    return on_image.reshape(grid, grid)


def grounding_cases(rows: list[dict], records, prefer_types=(), eos_token: str = "<|endoftext|>") -> list[dict]:
    """One right and one wrong held-out answer to a first question (the image is then the only place the answer can
    come from), of `prefer_types` when there are any (the binding types of a two-kind world), for
    :func:`show_grounding`. Two right ones when nothing was answered wrong. Rows are the evaluation's (``image``
    file name, ``turn``, ``type``, ``question``, ``expected``, ``predicted``, ``correct``)."""
    first = [r for r in rows if r.get("turn") == 0]
    first = [r for r in first if r["type"] in prefer_types] or first
    right = [r for r in first if r["correct"]]
    wrong = [r for r in first if not r["correct"]]
    picked = right[:1] + wrong[:1] if wrong else right[:2]
    if not wrong:
        print("no first question of these types was answered wrong: two right answers instead")
    images = {Path(record.image).name: record.image for record in records}
    return [{"image": Image.open(images[r["image"]]).convert("RGB"), "question": r["question"],
             "prompt": prompt_for_next_answer([], r["question"], eos_token), "expected": r["expected"],
             "predicted": r["predicted"], "correct": r["correct"]} for r in picked]


def show_grounding(model, processor, cases: list[dict], path=None) -> list[dict]:
    """For each case ({"image", "prompt", "question", "expected", "predicted", "correct"}, the evaluation's own
    verdict): the image with the attention of the answer's first token on each patch drawn over it, titled with the
    question and the answer (right or wrong). Returns each case's grid and its share of attention on the image."""
    import matplotlib.pyplot as plt

    if not cases:
        print("no held-out answer to a first question to show (the view needs the tiny world's scored answers)")
        return []

    fig, axes = plt.subplots(1, len(cases), figsize=(3.3 * len(cases), 3.6), squeeze=False)
    out = []
    for ax, case in zip(axes[0], cases):
        grid = image_attention(model, processor, case["image"], case["prompt"])
        share = grid / grid.sum()
        ax.imshow(case["image"])
        size = case["image"].size[0]
        ax.imshow(share.numpy(), cmap="magma", alpha=0.4, extent=(0, size, size, 0), vmin=0, vmax=1)
        for (row, col), value in zip([(r, c) for r in range(grid.shape[0]) for c in range(grid.shape[1])],
                                     share.flatten().tolist()):
            ax.text((col + 0.5) * size / grid.shape[1], (row + 0.5) * size / grid.shape[0], f"{value:.0%}",
                    ha="center", va="center", color="white", fontsize=9, fontweight="bold")
        right = case["correct"]
        verdict = "right" if right else "wrong: " + case["expected"]
        ax.set_title(f"{case['question']}\n{case['predicted']!r} ({verdict})", fontsize=8,
                     color="black" if right else "firebrick")
        ax.axis("off")
        out.append({"question": case["question"], "right": right, "grid": share.tolist(),
                    "image_share": float(grid.sum())})
    fig.suptitle("attention of the answer's first token on the image's cells (mean over heads and layers)",
                 fontsize=9)
    fig.tight_layout()
    save_and_show(fig, path)
    return out


# --------------------------------------------------------------------------------------------- 04: speech


def log_mel(samples) -> "torch.Tensor":
    """The 80-bin log-Mel spectrogram Whisper's encoder reads (openai-whisper's own feature code)."""
    import numpy as np
    import whisper

    return whisper.log_mel_spectrogram(np.asarray(samples, dtype=np.float32))


def plot_speech(samples, sample_rate: int, transcript: str, path=None):
    """A spoken question as Whisper receives it: the 16 kHz waveform beside its log-Mel spectrogram, with the
    transcript as the title. Returns the spectrogram's shape (mel bins, 10 ms frames)."""
    import matplotlib.pyplot as plt
    import numpy as np

    mel = log_mel(samples).numpy()
    fig, (wave_ax, mel_ax) = plt.subplots(1, 2, figsize=(10, 2.4), gridspec_kw={"width_ratios": [1, 1.3]})
    wave_ax.plot(np.arange(len(samples)) / sample_rate, samples, linewidth=0.4)
    wave_ax.set_xlabel("seconds")
    wave_ax.set_yticks([])
    wave_ax.set_title(f"waveform, {sample_rate} Hz")
    mel_ax.imshow(mel, origin="lower", aspect="auto", cmap="magma",
                  extent=[0, mel.shape[1] / 100, 0, mel.shape[0]])
    mel_ax.set_xlabel("seconds (10 ms frames)")
    mel_ax.set_ylabel("mel bin")
    mel_ax.set_title(f"log-Mel spectrogram {mel.shape[0]} x {mel.shape[1]}: what Whisper reads")
    fig.suptitle(f"heard: \u201c{transcript}\u201d", fontsize=10)
    fig.tight_layout()
    save_and_show(fig, path)
    return tuple(mel.shape)
