"""Answer questions about images: the same chat template as training, stock processor, KV-cached generation
that stops at EOS. Also the held-out exact-match evaluation used by notebooks 03-05."""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
from PIL import Image

from helpers.data.chat_template import prompt_for_next_answer, user_message
from helpers.models import precision
from helpers.models.fast_generation import generate_greedy
from helpers.views import reporting


@contextmanager
def left_padding(tok):
    side = tok.padding_side
    tok.padding_side = "left"  # generation continues from the right end of every row
    try:
        yield
    finally:
        tok.padding_side = side


def _device_dtype(model):
    p = next(model.parameters())
    return p.device, (p.dtype if p.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32)


@torch.no_grad()
def generate_answers(model, processor, images: list[Image.Image], prompts: list[str], max_new_tokens: int = 32,
                     batch_size: int | None = None):
    """Greedy answers for a batch of (image, prompt). Returns [(text, ended_with_eos)].

    On a GPU with a plain (merged) model this goes through ``helpers.models.fast_generation`` (static KV cache, compiled
    decoding step; batches padded to `batch_size` so every chunk of an evaluation reuses one compiled step);
    otherwise it is ``model.generate``."""
    tok = processor.tokenizer
    device, _ = _device_dtype(model)
    with left_padding(tok):
        inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    vision_dtype = next(model.get_base_model().model.vision_tower.parameters()).dtype \
        if hasattr(model, "get_base_model") else next(model.model.vision_tower.parameters()).dtype
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(vision_dtype)
    model.eval()

    out = generate_greedy(model, inputs["input_ids"], inputs.get("attention_mask"), inputs.get("pixel_values"),
                          max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, batch_size=batch_size)
    new = out[:, inputs["input_ids"].shape[1]:]
    results = []
    for row in new:
        ids = row.tolist()
        ended = tok.eos_token_id in ids
        if ended:
            ids = ids[: ids.index(tok.eos_token_id)]
        results.append((tok.decode(ids, skip_special_tokens=True).strip(), ended))
    return results


def load_assistant(checkpoint):
    """The merged assistant of stage 03 with stock transformers, straight onto the device it runs on, in the
    course's precision (``helpers.models.precision``: bf16 on GPUs with native bf16, fp16 with fp32 attention scores on
    a T4, fp32 on a CPU), plus its processor.
    Loading with ``device_map`` streams the safetensors shards to the GPU instead of building the model in host
    memory first."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    policy = precision.current()
    model = AutoModelForImageTextToText.from_pretrained(str(checkpoint), dtype=policy.dtype,
                                                        device_map=precision.device_map(),
                                                        attn_implementation=policy.attention)
    return model.eval(), AutoProcessor.from_pretrained(str(checkpoint))


def generation_batch_size(model, tokens_per_row: int, max_batch: int = 32, free_bytes: int | None = None,
                          safety: float = 0.7) -> int:
    """The largest batch (<= `max_batch`) whose KV cache and prefill activations fit the free GPU memory.

    Per row, greedy generation keeps keys and values of every layer for `tokens_per_row` positions (prompt + new
    tokens) and, during the prefill, a few hidden-state-sized activations per position and one row of logits.
    On a CPU (no `free_bytes` given and no GPU) the batch is `max_batch`."""
    if free_bytes is None:
        if not torch.cuda.is_available():
            return max_batch
        free_bytes = torch.cuda.mem_get_info()[0]
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    _, dtype = _device_dtype(model)
    width = torch.finfo(dtype).bits // 8
    kv = 2 * config.num_hidden_layers * config.hidden_size * tokens_per_row * width
    prefill = 6 * (config.intermediate_size or 4 * config.hidden_size) * tokens_per_row * width
    logits = config.vocab_size * 4 * 2
    per_row = kv + prefill + logits
    return max(1, min(max_batch, int(safety * free_bytes // per_row)))


def normalise(answer: str) -> str:
    return " ".join(answer.lower().strip().rstrip(".").split())


def blank_like(image: Image.Image) -> Image.Image:
    """The blind baseline's image: the same size, filled with the colour of its top-left pixel (the synthetic
    world's background; any corner of a photo): the prompt and its image tokens are there, what they show is not."""
    image = image.convert("RGB")
    return Image.new("RGB", image.size, image.getpixel((0, 0)))


def evaluate_conversations(model, processor, records, max_new_tokens: int = 16, batch_size: int | None = None,
                           progress: bool = True, judge=None, blind: bool = False) -> dict:
    """Exact-match accuracy on held-out conversations, turn by turn with the gold history in the prompt.

    blind: every image replaced by a blank one (:func:`blank_like`). What a model scores blind it answers from the
    question's words alone; the gap to the real score is what it reads from the image.

    Every record needs ``meta["types"]`` (question type per turn). Returns overall and per-type accuracy, the
    fraction of answers that ended with EOS, and every (question, expected, predicted) row. `batch_size` None:
    as many rows as the free GPU memory holds (:func:`generation_batch_size`, at most 32). `judge(predicted,
    expected) -> bool` replaces exact match (free-form answers: ``helpers.scoring.evaluation.judge_freeform``).
    """
    from tqdm.auto import tqdm

    jobs = []  # (image path, prompt, expected, type, question)
    for r in records:
        history = []
        turns = [(r.messages[i], r.messages[i + 1]) for i in range(0, len(r.messages) - 1, 2)]
        for k, (user, assistant) in enumerate(turns):
            question = user["content"].split("\n", 1)[-1] if k == 0 else user["content"]
            prompt = prompt_for_next_answer(history, question, processor.tokenizer.eos_token)
            types = r.meta.get("types") or []
            jobs.append((r.image, prompt, assistant["content"], types[k] if k < len(types) else "open", question, k))
            history += [user, assistant]
    if batch_size is None:
        longest = max((len(processor.tokenizer(j[1])["input_ids"]) for j in jobs), default=0)
        tokens = longest + getattr(model.config, "image_seq_length", 0) + max_new_tokens
        batch_size = generation_batch_size(model, tokens)
    rows = []
    desc = "answering held-out questions" + (" with blank images" if blind else "")
    for i in tqdm(range(0, len(jobs), batch_size), desc=desc, disable=not progress):
        chunk = jobs[i: i + batch_size]
        images = [Image.open(j[0]).convert("RGB") for j in chunk]
        images = [blank_like(im) for im in images] if blind else images
        answers = generate_answers(model, processor, images, [j[1] for j in chunk], max_new_tokens, batch_size)
        for (path, _, expected, qtype, question, turn), (pred, ended) in zip(chunk, answers):
            rows.append({"image": path.name, "type": qtype, "turn": turn, "question": question, "expected": expected,
                         "predicted": pred, "eos": ended,
                         "correct": judge(pred, expected) if judge else normalise(pred) == normalise(expected)})
    by_type, first_turn = defaultdict(list), defaultdict(list)
    for row in rows:
        by_type[row["type"]].append(row["correct"])
        if row["turn"] == 0:  # no history that could carry the answer
            first_turn[row["type"]].append(row["correct"])
    return {
        "first_turn_accuracy_by_type": {t: sum(v) / len(v) for t, v in sorted(first_turn.items())},
        "first_turn_count_by_type": {t: len(v) for t, v in sorted(first_turn.items())},
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "accuracy_by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
        "count_by_type": {t: len(v) for t, v in sorted(by_type.items())},
        "eos_rate": sum(r["eos"] for r in rows) / len(rows),
        "n_questions": len(rows),
        "rows": rows,
    }


class Assistant:
    """A multi-turn chat about one image: the history is fed back to the model at every turn."""

    def __init__(self, model, processor, max_new_tokens: int = 64):
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens
        self.history: list[dict] = []
        self.image: Image.Image | None = None

    def start(self, image: Image.Image):
        self.image, self.history = image.convert("RGB"), []

    def ask(self, question: str) -> str:
        if self.image is None:
            raise ValueError("Give an image first (Assistant.start(image)).")
        prompt = prompt_for_next_answer(self.history, question, self.processor.tokenizer.eos_token)
        (answer, _), = generate_answers(self.model, self.processor, [self.image], [prompt], self.max_new_tokens)
        user = {"role": "user", "content": prompt_user_content(self.history, question)}
        self.history += [user, {"role": "assistant", "content": answer}]
        return answer


def prompt_user_content(history: list[dict], question: str) -> str:
    return user_message(question, with_image=not history)["content"]


def plot_accuracy(by_type: dict[str, float], overall: float, path=None, ylabel: str = "held-out exact match (%)"):
    """Bar chart of exact-match accuracy per question type, with the overall figure as a line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.bar(list(by_type), [100 * v for v in by_type.values()], color="#4c72b0")
    ax.axhline(100 * overall, color="grey", linestyle="--", label=f"overall {overall:.1%}")
    ax.set_ylim(0, 100)
    ax.set_ylabel(ylabel)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return reporting.save_and_show(fig, path)
