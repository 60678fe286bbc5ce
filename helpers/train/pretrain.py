"""Stage 01's parts that are not the lesson (the lesson, PhiConfig and the trainer, is in notebook 01's cells).

Documents are tokenized, each closed by EOS, and packed whole into fixed-length blocks; the rest of a block is
padding, located by the attention mask (never by id: pad == EOS), so every real EOS is an ordinary target. One
teacher-forced forward per batch; the model shifts the labels by one internally. In tiny mode the result is also
probed on text-only questions: can the LM answer from a description in words?
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import Dataset

from helpers.data.chat_template import render, user_message
from helpers.data.hub_data import pretrain_texts
from helpers.data.world import (
    CAPTION_REQUEST,
    ask,
    build_world,
    caption,
    described_questions,
    sample_scene,
    scene_types,
    world_vocabulary,
)
from helpers.models.inference import left_padding, normalise
from helpers.train.training import mean_target_loss


class PackedBlocks(Dataset):
    def __init__(self, blocks: torch.Tensor, mask: torch.Tensor):
        self.blocks, self.mask = blocks, mask

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        ids, mask = self.blocks[i], self.mask[i]
        labels = ids.masked_fill(mask == 0, -100)  # padding found by the mask: pad == EOS in Phi-2
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack_documents(tok, documents: list[str], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack whole documents (each closed by EOS) greedily into blocks of ``block_size`` tokens.

    A document is never cut across two blocks unless it is longer than a block by itself, so questions always
    see the description they refer to. The tail of a block is padding: its attention mask is 0 and the loss
    ignores it. Returns (ids, attention mask), both ``[n_blocks, width]``: `width` is ``block_size`` unless even
    the fullest block is shorter.

    The block size decides how many documents share a row. The tiny profile gives every dialogue a row of its
    own: with four unrelated dialogues per 256-token row, the LM had to learn to find *its own* description among
    other scenes' ones, and answering from the description emerged far later (measured on text-only questions,
    3-question dialogues: colour 72 %, shape 36 %, yes/no 60 % after 600 steps, against 100 % for every type
    after 500 steps with one dialogue per 80-token row and the same tokens per step).
    """
    blocks, current = [], []
    for doc in documents:
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        if not ids or ids[-1] != tok.eos_token_id:
            ids.append(tok.eos_token_id)
        if len(current) + len(ids) > block_size and current:
            blocks.append(current)
            current = []
        while len(ids) > block_size:
            blocks.append(ids[:block_size])
            ids = ids[block_size:]
        current = current + ids
    if current:
        blocks.append(current)
    if not blocks:
        raise ValueError("no text to pretrain on")
    # columns that are padding in every row are dropped (one dialogue per row: rows as long as the longest one),
    # which changes no real token's loss (causal attention, padding on the right) and saves their compute
    width = max(len(b) for b in blocks)
    ids = torch.full((len(blocks), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(blocks), width), dtype=torch.long)
    for i, b in enumerate(blocks):
        ids[i, : len(b)] = torch.tensor(b)
        mask[i, : len(b)] = 1
    return ids, mask


def split_blocks(packed: tuple[torch.Tensor, torch.Tensor], heldout_fraction: float = 0.05, seed: int = 0):
    """Random (train, held-out) split of packed blocks; each part is an (ids, mask) pair."""
    blocks, mask = packed
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=g)
    n_eval = max(1, int(len(blocks) * heldout_fraction))
    train, held = order[n_eval:], order[:n_eval]
    return (blocks[train], mask[train]), (blocks[held], mask[held])


def mean_loss(model, packed: tuple[torch.Tensor, torch.Tensor], batch_size: int = 32) -> float:
    """Token-weighted mean next-token cross-entropy of `model` on packed blocks (nats/token), padding excluded."""
    dataset = PackedBlocks(*packed)
    rows = [dataset[j] for j in range(len(dataset))]
    batches = ({k: torch.stack([r[k] for r in rows[i:i + batch_size]]) for k in rows[0]}
               for i in range(0, len(rows), batch_size))
    return mean_target_loss(model, batches)


def read_corpus(path: str | Path) -> list[str]:
    return [line for line in Path(path).read_text().splitlines() if line.strip()]


def load_text_documents(profile, paths) -> list[str]:
    """Tiny: the synthetic world's corpus. Full: clean text from the Hub (TinyStories by default)."""
    if profile.world is not None:
        return read_corpus(build_world(paths.world, profile.world).corpus)

    return pretrain_texts(profile, profile.n_train_samples or 20000)


def uniform_loss(vocab_size: int) -> float:
    """Cross-entropy of a model that knows nothing: ln(vocabulary size)."""
    return math.log(vocab_size)


@torch.no_grad()
def text_answer_accuracy(model, tok, probes: list[dict], batch_size: int = 64, max_new_tokens: int = 8) -> dict:
    """Exact-match accuracy of greedy answers to text-only questions (see ``world.described_questions``).

    Each probe is rendered with the course's one chat template up to ``ASSISTANT:``; generation is batched with
    left padding, KV-cached and stops at EOS. Returns overall and per-type accuracy."""
    from collections import defaultdict

    model.eval()
    correct = defaultdict(list)
    for i in range(0, len(probes), batch_size):
        chunk = probes[i: i + batch_size]
        prompts = [render(p["messages"], tok.eos_token, add_generation_prompt=True) for p in chunk]
        with left_padding(tok):
            inputs = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for probe, row in zip(chunk, out[:, inputs["input_ids"].shape[1]:]):
            answer = tok.decode(row, skip_special_tokens=True)
            correct[probe["type"]].append(normalise(answer) == normalise(probe["answer"]))
    every = [c for v in correct.values() for c in v]
    return {"accuracy": sum(every) / len(every),
            "accuracy_by_type": {t: sum(v) / len(v) for t, v in sorted(correct.items())}}


TEXT_PROBE_SCENES = 100  # fresh scenes whose caption is given in words, then one question of each type


def text_probe(model, tok, world_spec, n_scenes: int = TEXT_PROBE_SCENES) -> dict:
    """Can the LM answer from a description in words (the skill notebooks 02 and 03 build on)? Fresh scenes of the
    profile's world (a seed stream of their own, never in the corpus), one question of each type, scored exactly.
    Returns the metrics notebook 01 records: text_qa_accuracy, text_qa_accuracy_by_type, n_text_qa."""
    probes = described_questions(n_scenes, world_spec.world_seed * 1000 + 4, world_vocabulary(world_spec))
    qa = text_answer_accuracy(model, tok, probes)
    return {"text_qa_accuracy": qa["accuracy"], "text_qa_accuracy_by_type": qa["accuracy_by_type"],
            "n_text_qa": len(probes)}


@torch.no_grad()
def sample_continuations(model, tok, prompts: list[str], max_new_tokens: int = 40):
    """Greedy continuations (KV-cached, stopping at EOS) of each prompt."""
    model.eval()
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out.append((prompt, tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=False)))
    return out


STORY_PROMPTS = ["Once upon a time, there was a little", "Tom and his dog went to the park. Tom saw",
                 "The sun was hot. Lily wanted to", "One day, a big bird"]


def sample_prompts(profile, n_scenes: int = 2) -> list[str]:
    """Prompts to show what the LM learned: a described scene and questions about it (tiny world, in the chat
    template it was trained on), or the beginnings of stories (full: TinyStories)."""
    if profile.world is None:
        return list(STORY_PROMPTS)
    import random

    vocab = world_vocabulary(profile.world)  # the objects, wording and scenes of the profile's world
    rng = random.Random(12345)
    prompts = [render([user_message(CAPTION_REQUEST, with_image=False)], add_generation_prompt=True)]
    for _ in range(n_scenes):
        scene = sample_scene(rng, vocab)
        context = [user_message(CAPTION_REQUEST, with_image=False),
                   {"role": "assistant", "content": caption(scene, vocab)}]
        for qtype in rng.sample(scene_types(scene), 2):
            asked = ask(scene, qtype, rng, vocab=vocab)
            if asked:
                prompts.append(render(context + [user_message(asked[0], with_image=False)],
                                      add_generation_prompt=True))
    return prompts
