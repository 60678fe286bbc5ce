"""MMStar (full profile): the reader on the stand-in's real file format, the letter parser, the likelihood scorer.

The stand-in parquet (rehearsal.standins.write_mmstar: 6 categories x 4 questions, PNG and JPEG images) is written
once per module in a couple of seconds; the models are the tiny random LLaVA of tests/conftest.py.
"""
from __future__ import annotations

import copy

import pytest
import torch

from helpers.config import FULL, Paths
from helpers.data.hub_data import mmstar_questions
from helpers.data.sources import SourceError
from helpers.scoring.evaluation import (
    MMSTAR_LETTERS,
    evaluate_mmstar,
    letter_logprobs,
    letter_token_ids,
    mmstar_letter,
    mmstar_options,
    show_scores,
)
from rehearsal import standins


@pytest.fixture(scope="module")
def mmstar_repo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mmstar_repo")
    standins.write_mmstar(folder, standins.spec_for("small"))
    return folder


@pytest.fixture(scope="module")
def questions(mmstar_repo, tmp_path_factory):
    profile = FULL.replace(mmstar_dataset=str(mmstar_repo))
    return mmstar_questions(profile, Paths(profile, tmp_path_factory.mktemp("out")), 12)


def test_reader_spreads_questions_over_categories_and_writes_images(questions, mmstar_repo, tmp_path):
    """Catches: questions taken from the top of the file (one category only), a category getting none, images not
    written (or written unreadable), answers not normalised to a letter, the options lost from the question text,
    the file's own path not accepted as the setting."""
    from PIL import Image

    assert len(questions) == 12
    counts = {c: sum(q["category"] == c for q in questions) for c in standins.MMSTAR_CATEGORIES}
    assert set(counts.values()) == {2}  # 12 questions over 6 categories
    for q in questions:
        assert q["answer"] in MMSTAR_LETTERS and "\nOptions: A: " in q["question"]
        assert q["image"].parent.name == "images" and q["image"].parent.parent.name == "mmstar"
        with Image.open(q["image"]) as image:
            assert image.size[0] > 100
    assert {q["image"].suffix for q in questions} == {".png", ".jpg"}
    eight = mmstar_questions(FULL.replace(mmstar_dataset=str(mmstar_repo / "mmstar.parquet")),
                             Paths(FULL, tmp_path), 8)  # the file itself; 8 over 6 categories: 2, 2, 1, 1, 1, 1
    assert sorted(sum(q["category"] == c for q in eight) for c in standins.MMSTAR_CATEGORIES) == [1, 1, 1, 1, 2, 2]


def test_reader_names_the_setting_when_the_file_or_a_column_is_missing(tmp_path):
    """Catches: a KeyError deep in the reader, or an error that does not say which setting to fix."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(SourceError, match="MMPHI_MMSTAR"):
        mmstar_questions(FULL.replace(mmstar_dataset=str(tmp_path)), Paths(FULL, tmp_path / "out"), 4)
    pq.write_table(pa.table({"index": [0], "question": ["Q?\nOptions: A: x, B: y, C: z, D: w"], "answer": ["A"],
                             "image": [{"bytes": b"", "path": None}]}), tmp_path / "mmstar.parquet")
    with pytest.raises(SourceError, match=r"MMPHI_MMSTAR.*category"):
        mmstar_questions(FULL.replace(mmstar_dataset=str(tmp_path)), Paths(FULL, tmp_path / "out"), 4)


def test_letter_parser():
    """Catches: "A" the article read as option A, "(B)" / "B." / "The answer is C" missed, an answer that repeats
    an option's text not credited, and an answer naming two options credited to one of them."""
    options = mmstar_options("Where is it?\nOptions: A: On the book., B: Beneath the cat, C: 3, 4 and 5, D: None")
    assert options == {"A": "On the book.", "B": "Beneath the cat", "C": "3, 4 and 5", "D": "None"}
    cases = {"B": "B", "(C)": "C", "D.": "D", "A: on the book": "A", "The answer is C.": "C",
             "I think B is right": "B", "A cat sits on a mat.": None, "It is beneath the cat.": "B", "None": "D",
             "On the book or beneath the cat": None, "": None}
    assert {text: mmstar_letter(text, options) for text in cases} == cases


def test_likelihood_scores_a_letter_per_question(llava, processor, questions):
    """Catches: scores not one of A-D, accuracies outside [0, 1], the headline not the generated letter, blind not
    reaching the rows, and the score table failing on real metrics."""
    real = evaluate_mmstar(llava, processor, questions[:6], max_new_tokens=3, progress=False)
    blind = evaluate_mmstar(llava, processor, questions[:6], blind=True, max_new_tokens=3, progress=False)
    m = real["metrics"]
    assert m["n"] == 6 and m["headline"] == "generated_letter" and m["chance"] == 0.25
    assert m["headline_accuracy"] == m["generated_letter"]["overall"]
    assert all(r["likelihood_letter"] in MMSTAR_LETTERS and set(r["letter_logprobs"]) == set(MMSTAR_LETTERS)
               for r in real["rows"])
    for method in ("generated_letter", "likelihood"):
        assert set(m[method]) == {"overall", *m["n_by_category"]}
        assert all(0.0 <= v <= 1.0 for v in m[method].values())
    assert all(r["blind"] for r in blind["rows"]) and not any(r["blind"] for r in real["rows"])
    show_scores({"mmstar": m, "mmstar_blind": blind["metrics"]})


def test_a_model_that_prefers_b_scores_every_b_question(llava, processor, questions):
    """The LM head pushed towards "B" (its one-token spelling without a space): by likelihood every question whose
    answer is B is right and every other one wrong, and so is the one-token generated answer. Catches: letter ids
    looked up wrongly, only the " B" spelling scored, the argmax taken over the wrong axis, or accuracy compared
    against the wrong field."""
    tok = processor.tokenizer
    b_id, = tok("B", add_special_tokens=False)["input_ids"]
    assert b_id in letter_token_ids(tok)["B"]
    model = copy.deepcopy(llava)
    push = torch.zeros(model.lm_head.out_features)
    push[b_id] = 50.0
    model.lm_head.register_forward_hook(lambda module, args, out: out + push.to(out.dtype))
    result = evaluate_mmstar(model, processor, questions, max_new_tokens=1, progress=False)
    share_b = sum(q["answer"] == "B" for q in questions) / len(questions)
    assert 0 < share_b < 1
    assert result["metrics"]["likelihood"]["overall"] == pytest.approx(share_b)
    assert result["metrics"]["generated_letter"]["overall"] == pytest.approx(share_b)
    assert all(r["likelihood_letter"] == "B" for r in result["rows"])


def test_letter_scores_do_not_depend_on_the_batch(llava, processor, questions):
    """Prompts of different lengths scored together equal each one scored alone. Catches: left padding without
    reading a padded position's logits (the first column under left padding, or the last under right padding)."""
    from PIL import Image

    from helpers.data.chat_template import prompt_for_next_answer
    from helpers.scoring.evaluation import MMSTAR_SUFFIX

    picked = [questions[0], questions[3], questions[10]]
    prompts = [prompt_for_next_answer([], q["question"] + MMSTAR_SUFFIX, processor.tokenizer.eos_token)
               for q in picked]
    assert len({len(processor.tokenizer(p)["input_ids"]) for p in prompts}) > 1
    images = [Image.open(q["image"]).convert("RGB") for q in picked]
    ids = letter_token_ids(processor.tokenizer)
    together = letter_logprobs(llava, processor, images, prompts, ids)
    for k in range(3):
        alone, = letter_logprobs(llava, processor, images[k: k + 1], prompts[k: k + 1], ids)
        assert alone == pytest.approx(together[k], abs=1e-4)
