"""Packing for pretraining: whole documents per block, padding masked by length, every real EOS a target."""
import pytest
import torch

from helpers.train.pretrain import PackedBlocks, pack_documents, split_blocks


def test_documents_are_packed_whole_and_padding_is_masked(tok):
    docs = ["USER: Where is it? ASSISTANT: top left<|endoftext|>", "USER: What shape? ASSISTANT: circle",
            "USER: How many objects are there? ASSISTANT: two<|endoftext|>"]
    lengths = [len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs]
    lengths[1] += 1  # the second document gets its missing EOS
    block = lengths[0] + lengths[1] + 2  # room for the first two documents, not the third
    ids, mask = pack_documents(tok, docs, block)
    assert ids.shape == (2, lengths[0] + lengths[1])  # the 2 columns of padding in every row are dropped
    assert mask[0].sum() == lengths[0] + lengths[1] and mask[1].sum() == lengths[2]
    eos = tok.eos_token_id
    assert ids[0, lengths[0] - 1] == eos and ids[0, lengths[0] + lengths[1] - 1] == eos
    example = PackedBlocks(ids, mask)[0]
    # padding (same id as EOS) is ignored; the real EOS tokens are targets
    assert (example["labels"][mask[0] == 0] == -100).all()
    assert example["labels"][lengths[0] - 1] == eos
    assert (ids[0][mask[0] == 0] == tok.pad_token_id).all()


def test_dropping_all_padding_columns_changes_no_loss(tok, profile):
    from helpers.models.modeling import new_phi_lm
    from helpers.train.pretrain import mean_loss

    docs = ["USER: Where is it? ASSISTANT: top left<|endoftext|>", "USER: How many objects are there? ASSISTANT: two"]
    trimmed = pack_documents(tok, docs, 64)
    width = trimmed[0].shape[1]
    assert width < 64
    padded = tuple(torch.nn.functional.pad(t, (0, 64 - width), value=v)
                   for t, v in zip(trimmed, (tok.pad_token_id, 0)))
    lm = new_phi_lm(profile.pretrain_phi, tok, seed=0)
    assert mean_loss(lm, trimmed) == pytest.approx(mean_loss(lm, padded), abs=1e-5)


def test_overlong_document_is_split_rather_than_dropped(tok):
    doc = " ".join(["red square"] * 40)
    n = len(tok(doc, add_special_tokens=False)["input_ids"]) + 1
    ids, mask = pack_documents(tok, [doc], 16)
    assert int(mask.sum()) == n


def test_split_is_disjoint_and_complete(tok):
    ids = torch.arange(40).view(20, 2)
    (tr, trm), (ho, hom) = split_blocks((ids, torch.ones_like(ids)), heldout_fraction=0.25, seed=0)
    assert len(tr) == 15 and len(ho) == 5
    assert sorted(torch.cat([tr, ho])[:, 0].tolist()) == ids[:, 0].tolist()


def test_text_probes_describe_a_scene_then_ask_one_question_per_type():
    from helpers.data.world import CAPTION_REQUEST, ONE_KIND_TYPES, described_questions

    probes = described_questions(30, seed=4)
    assert probes == described_questions(30, seed=4)  # deterministic
    assert {p["type"] for p in probes} == set(ONE_KIND_TYPES)  # the default vocabulary (share 0): one kind per scene
    for p in probes:
        request, described, question = p["messages"]
        assert request == {"role": "user", "content": CAPTION_REQUEST}
        assert described["role"] == "assistant" and question["role"] == "user"
        assert "<image>" not in question["content"]  # text only: the description is the only evidence
        if p["type"] in ("colour", "shape"):
            assert p["answer"] in described["content"]


class AnswerKnower:
    """A stand-in LM whose "generation" appends the right answer + EOS (+ padding, as batched generate does).

    It reads the answer off the prompt text, so it checks that the scorer cuts the new tokens correctly out of
    left-padded rows and decodes them the way the chat template wrote them."""

    def __init__(self, tok, probes, wrong_type=None):
        from helpers.data.chat_template import render

        self.tok, self.device = tok, torch.device("cpu")
        self.answers = {render(p["messages"], tok.eos_token, add_generation_prompt=True):
                        ("maybe" if p["type"] == wrong_type else p["answer"]) for p in probes}

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            assert mask[-1] == 1  # left padding: every prompt ends at the right edge
            prompt = self.tok.decode(ids[mask == 1])
            new = self.tok(" " + self.answers[prompt], add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            rows.append(ids.tolist() + (new + [self.tok.pad_token_id] * max_new_tokens)[:max_new_tokens])
        return torch.tensor(rows)


def test_text_answer_accuracy_scores_exactly_per_type(tok):
    from helpers.data.world import described_questions
    from helpers.train.pretrain import text_answer_accuracy

    probes = described_questions(20, seed=5)
    perfect = text_answer_accuracy(AnswerKnower(tok, probes), tok, probes, batch_size=7)
    assert perfect["accuracy"] == 1.0 and set(perfect["accuracy_by_type"].values()) == {1.0}
    no_yes_no = text_answer_accuracy(AnswerKnower(tok, probes, wrong_type="yes/no"), tok, probes, batch_size=7)
    assert no_yes_no["accuracy_by_type"]["yes/no"] == 0.0 and no_yes_no["accuracy_by_type"]["colour"] == 1.0
    n_yes_no = sum(p["type"] == "yes/no" for p in probes)
    assert no_yes_no["accuracy"] == pytest.approx(1 - n_yes_no / len(probes))


def test_batched_text_answers_equal_one_at_a_time(tok, profile):
    """Left padding must not change what the LM answers (pad == EOS; positions come from the attention mask)."""
    from helpers.data.world import described_questions
    from helpers.models.modeling import new_phi_lm
    from helpers.train.pretrain import text_answer_accuracy

    lm = new_phi_lm(profile.pretrain_phi, tok, seed=0)
    probes = described_questions(6, seed=6)
    seen = []
    original = lm.generate

    def recording_generate(**kw):
        out = original(**kw)
        width = kw["input_ids"].shape[1]
        seen.extend(out[:, width:].tolist())
        return out

    lm.generate = recording_generate
    text_answer_accuracy(lm, tok, probes, batch_size=len(probes))
    batched, seen[:] = list(seen), []
    text_answer_accuracy(lm, tok, probes, batch_size=1)
    assert len(batched) == len(seen) == len(probes)
    for a, b in zip(batched, seen):
        assert a[: len(b)] == b[: len(a)]


def test_rerunning_a_finished_stage_loads_it_instead_of_training_more(tmp_path, world, tok, profile):
    """A notebook run twice: the second run finds the finished checkpoint, loads it and trains nothing (Trainer
    itself would take one step beyond max_steps)."""
    import dataclasses

    from helpers.config import Paths, StageSpec
    from helpers.course import run_cells
    from helpers.train.pretrain import read_corpus

    torch.manual_seed(0)
    spec = StageSpec(learning_rate=3e-3, batch_size=8, max_steps=3, logging_steps=1)
    small = dataclasses.replace(profile, pretrain=spec)
    paths = Paths(small, tmp_path)
    docs = read_corpus(world.corpus)[:120]

    def notebook_01():  # its cells: blocks, model, trainer, train (resumed: RESUME = True)
        cells = run_cells("01_pretrain_phi", ["blocks", "model", "trainer", "train"], profile=small, paths=paths,
                          tok=tok, documents=docs, SAVE_STEPS=3, RESUME=True)
        return cells["trainer"], cells["model"]

    first, model = notebook_01()
    again, model_again = notebook_01()
    assert first.state.global_step == again.state.global_step == 3
    logged = [row for row in first.state.log_history if "train_runtime" not in row]  # the end-of-run summary row
    assert again.state.log_history == logged
    for a, b in zip(model.state_dict().values(), model_again.state_dict().values()):
        assert torch.equal(a, b)
