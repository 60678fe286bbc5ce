"""Stage 03's faster training computes the same thing: the loss at answer positions only (chunked, no full logits)
equals the model's own loss, and length-balanced micro-batches give the same optimizer step as random ones."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers.config import Paths, StageSpec
from helpers.data.encoding import PadCollator


@pytest.fixture(scope="module")
def instruct_examples(world, tok, profile, llava, tmp_path_factory):
    from helpers.data.multimodal_data import read_llava_instruct
    from helpers.models.modeling import image_processor
    from helpers.train.projection import feature_table, make_dataset

    records, _ = read_llava_instruct(world.instruct("train"), world.images("train"))
    feats, index = feature_table(llava.model.vision_tower, image_processor(profile.vision), records,
                                 profile.vision_feature_layer, tmp_path_factory.mktemp("feats") / "train")
    return make_dataset(records, tok, profile, feats, index, profile.instruct)


def _batch(dataset, tok, ids):
    return PadCollator(tok.pad_token_id)([dataset[i] for i in ids])


def test_answer_only_loss_equals_the_models_loss_and_gradient(llava, tok, instruct_examples):
    from helpers.train.training import answer_only_loss, project_cached_features

    model = llava.train()
    model.requires_grad_(False).model.multi_modal_projector.requires_grad_(True)
    ids = [0, 5, 9, 17]
    batch = _batch(instruct_examples, tok, ids)
    assert len({len(instruct_examples[i]["input_ids"]) for i in ids}) > 1  # padded rows

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() for p in model.model.multi_modal_projector.parameters()]

    for num_items in (None, torch.tensor(57)):  # a micro-batch's own mean, or Trainer's optimizer-batch count
        inputs = {k: v for k, v in batch.items() if k != "vision_features"}
        inputs["mm_encoder_outputs"] = project_cached_features(model, batch["vision_features"])
        extra = {} if num_items is None else {"num_items_in_batch": num_items}
        old = model(**inputs, use_cache=False, **extra).loss
        old_grads = grads(old)
        inputs["mm_encoder_outputs"] = project_cached_features(model, batch["vision_features"])
        new, n = answer_only_loss(model, inputs, num_items, chunk_tokens=7)  # several chunks
        new_grads = grads(new)
        assert n == int((batch["labels"][:, 1:] != -100).sum())
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6)
        for a, b in zip(new_grads, old_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        # another cross-entropy sum (the hook a fused kernel plugs into) gets exactly the answer positions
        seen = []

        def whole_sum(head, hidden, targets):
            seen.append(targets.numel())
            return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")

        inputs["mm_encoder_outputs"] = project_cached_features(model, batch["vision_features"])
        other, _ = answer_only_loss(model, inputs, num_items, loss_sum=whole_sum)
        assert seen == [n]
        torch.testing.assert_close(other, old, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_matches_one_piece():
    from helpers.train.training import chunked_cross_entropy_sum

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    whole = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    (g_whole,) = torch.autograd.grad(whole, hidden)
    chunked = chunked_cross_entropy_sum(head, hidden, targets, chunk_tokens=5)
    (g_chunked,) = torch.autograd.grad(chunked, hidden)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(g_chunked, g_whole)


def test_balanced_micro_batches_give_the_same_optimizer_step(saved_llava, tok, profile, instruct_examples, tmp_path):
    """One optimizer step over the same 8 conversations, cut into 4 micro-batches at random with the model's own
    loss (the old way) or by length with the answer-only loss (the new way): same logged loss, same new weights."""
    from conftest import qlora_model, train_qlora
    from torch.utils.data import Subset

    torch.set_num_threads(1)
    data = Subset(instruct_examples, list(range(8)))
    quick = dataclasses.replace(profile, instruct=StageSpec(learning_rate=2e-3, batch_size=2, grad_accum=4,
                                                            max_steps=1, logging_steps=1, max_length=160))
    results = {}
    for way, fast in (("old", False), ("new", True)):
        model = qlora_model(saved_llava, quick)
        trainer = train_qlora(model, data, tok, quick, Paths(quick, tmp_path / way), save_steps=0,
                                 length_balanced=fast, answer_only_loss=fast, disable_tqdm=True)
        assert trainer.args.train_sampling_strategy == ("batch_rebalance" if fast else "random")
        loss = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results[way] = (loss, weights)
    (old_loss, old_w), (new_loss, new_w) = results["old"], results["new"]
    assert old_loss == pytest.approx(new_loss, rel=1e-5)
    assert old_w.keys() == new_w.keys()
    for name in old_w:
        torch.testing.assert_close(new_w[name], old_w[name], rtol=1e-4, atol=1e-6)


def test_balanced_sampler_cuts_each_random_optimizer_batch_by_length():
    """The sampler transformers provides: every optimizer batch is a random draw of batch x accumulation examples
    (all of them used once per epoch), cut into micro-batches of similar length, and no micro-batch is longer in
    padded tokens than the plan's worst case (batch_size rows of the longest allowed length)."""
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    torch.manual_seed(0)
    lengths = (torch.distributions.LogNormal(5.6, 0.5).sample((1000,)).clamp(60, 1024)).long().tolist()
    batch, accum = 4, 32
    sampler = BatchRebalanceSampler(lengths, effective_batch_size=batch * accum, dp_size=1, grad_accum=accum,
                                    seed=3, drop_last=False)
    micro = list(sampler)
    seen = [i for mb in micro for i in mb]
    assert set(seen) == set(range(1000))
    padded_random = padded_balanced = 0
    for step in range(len(micro) // accum):
        group = micro[step * accum:(step + 1) * accum]
        members = [i for mb in group for i in mb]
        assert len(members) == batch * accum or step == len(micro) // accum - 1
        for mb in group:
            padded_balanced += len(mb) * max(lengths[i] for i in mb)
            assert len(mb) * max(lengths[i] for i in mb) <= batch * 1024
        shuffled = [members[i] for i in torch.randperm(len(members)).tolist()]
        for k in range(0, len(shuffled), batch):  # the same optimizer batch cut at random
            chunk = shuffled[k:k + batch]
            padded_random += len(chunk) * max(lengths[i] for i in chunk)
    real = sum(lengths)
    assert padded_balanced < 1.1 * real < 0.75 * padded_random  # measured: +3 % padding vs +55 %


def test_balanced_batches_resume_where_they_stopped(saved_llava, tok, profile, instruct_examples, tmp_path):
    """A run stopped after step 4 (a disconnected session) and resumed from its checkpoint continues with the same
    length-balanced micro-batches: the same losses as a run that never stopped."""
    from conftest import qlora_model, train_qlora
    from torch.utils.data import Subset
    from transformers import TrainerCallback

    torch.set_num_threads(1)
    data = Subset(instruct_examples, list(range(24)))
    quick = dataclasses.replace(profile, instruct=StageSpec(learning_rate=2e-3, batch_size=2, grad_accum=2,
                                                            max_steps=6, logging_steps=1, max_length=160))

    class StopAt4(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                control.should_training_stop = True

    def run(out, callbacks=None):
        model = qlora_model(saved_llava, quick)
        trainer = train_qlora(model, data, tok, quick, Paths(quick, out), save_steps=2, callbacks=callbacks,
                                 disable_tqdm=True)
        assert trainer.args.train_sampling_strategy == "batch_rebalance"
        return {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}

    straight = run(tmp_path / "a")
    stopped = run(tmp_path / "b", [StopAt4()])
    assert max(stopped) == 4
    resumed = run(tmp_path / "b")  # its history holds steps 1-4 from the checkpoint, then the two new ones
    assert set(resumed) == set(straight) == {1, 2, 3, 4, 5, 6}
    for step in (5, 6):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6)


def test_flop_count_is_trainers_own_with_the_parameter_count_taken_once(tmp_path, monkeypatch):
    from transformers import PhiConfig, PhiForCausalLM, Trainer, TrainingArguments

    from helpers.train.training import CourseTrainer

    model = PhiForCausalLM(PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=32))
    trainer = CourseTrainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True))
    inputs = {"input_ids": torch.zeros(3, 7, dtype=torch.long)}
    expected = Trainer.floating_point_ops(trainer, inputs)
    assert expected > 0
    counts = []
    original = type(model).num_parameters
    monkeypatch.setattr(type(model), "num_parameters",
                        lambda self, *a, **k: counts.append(1) or original(self, *a, **k))
    assert [trainer.floating_point_ops(inputs) for _ in range(5)] == [expected] * 5
    assert trainer.floating_point_ops({"input_ids": torch.zeros(2, 5, dtype=torch.long)}) == expected * 10 // 21
    assert len(counts) == 1
    assert trainer.floating_point_ops({"pixel_values": torch.zeros(1)}) == 0
