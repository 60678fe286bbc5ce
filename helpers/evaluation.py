"""Evaluation that means something at full scale: POPE and judged free-form answers.

Exact match is the right score for the tiny world (short answers from a closed vocabulary) and meaningless for
LLaVA-Instruct's free-form answers. In the full profile stage 03 therefore reports:

* **POPE** (Li et al., 2023; ``lmms-lab/POPE``): "Is there a <object> in the image?" on COCO images, in three
  categories (random, popular and adversarial absent objects). An answer counts as **no** when its words include
  "no" or "not", else as **yes** (the POPE paper's rule). Reported per category and overall: accuracy, precision,
  recall and F1 of "yes", and the yes-ratio (a model that always says yes has F1 66.7 and yes-ratio 1.0).
  TinyLLaVA's Phi-2 + CLIP-L/336 model reports F1 86.8; LLaVA-Instruct alone scores well below such recipes.
* **Free-form answers**, judged by one documented rule (:func:`judge_freeform`): both answers are normalised
  (lower case, punctuation removed, numbers as words), reduced to content words (a fixed stop-word list removed),
  and the prediction is *correct* when it contains at least half of the reference's content words (content-word
  recall >= 0.5). Content-word F1 is reported beside it. The rule rewards naming what the reference names, not
  phrasing; it cannot tell a true statement from a false one that uses the same words: read the samples.

Questions are asked with the course's one chat template; POPE adds LLaVA-1.5's short-answer instruction.
"""
from __future__ import annotations

import re
from collections import defaultdict

from PIL import Image

from .chat_template import prompt_for_next_answer

POPE_SUFFIX = "\nAnswer the question using a single word or phrase."
STOP_WORDS = frozenset("""a an the and or but if then so of in on at to for from by with without about into over under
is are was were be been being am do does did has have had it its it's this that these those there here
i you he she we they me him her us them my your his our their what which who whom whose when where why how
as than too very can could would should will shall may might must also just only not no yes image picture
photo shows show shown seen see""".split())
_NUMBERS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six", "7": "seven",
            "8": "eight", "9": "nine", "10": "ten", "11": "eleven", "12": "twelve"}


# ------------------------------------------------------------------------------------------------- POPE
def pope_answer(text: str) -> str:
    """POPE's rule: "no" if the answer's words include "no" or "not", else "yes"."""
    words = re.findall(r"[a-z']+", text.lower())
    return "no" if "no" in words or "not" in words else "yes"


def pope_scores(rows: list[dict]) -> dict:
    """Accuracy, precision, recall, F1 (of "yes") and yes-ratio, for `rows` of {"expected", "predicted"}."""
    tp = sum(r["expected"] == "yes" and r["predicted"] == "yes" for r in rows)
    fp = sum(r["expected"] == "no" and r["predicted"] == "yes" for r in rows)
    fn = sum(r["expected"] == "yes" and r["predicted"] == "no" for r in rows)
    tn = sum(r["expected"] == "no" and r["predicted"] == "no" for r in rows)
    n = max(1, len(rows))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "n": len(rows)}


def pope_metrics(rows: list[dict]) -> dict:
    """:func:`pope_scores` per category and over all rows."""
    by_category = defaultdict(list)
    for r in rows:
        by_category[r["category"]].append(r)
    return {"overall": pope_scores(rows), **{c: pope_scores(v) for c, v in sorted(by_category.items())}}


def evaluate_pope(model, processor, questions: list[dict], batch_size: int | None = None,
                  progress: bool = True) -> dict:
    """Ask every POPE question (``{"question", "answer", "category", "image"}``) and score the answers."""
    from .inference import generate_answers, generation_batch_size

    from tqdm.auto import tqdm

    eos = processor.tokenizer.eos_token
    prompts = [prompt_for_next_answer([], q["question"] + POPE_SUFFIX, eos) for q in questions]
    if batch_size is None:
        longest = max((len(processor.tokenizer(p)["input_ids"]) for p in prompts), default=0)
        batch_size = generation_batch_size(model, longest + getattr(model.config, "image_seq_length", 0) + 8)
    rows = []
    for i in tqdm(range(0, len(questions), batch_size), desc="POPE", disable=not progress):
        chunk = questions[i: i + batch_size]
        images = [Image.open(q["image"]).convert("RGB") for q in chunk]
        for q, (text, _) in zip(chunk, generate_answers(model, processor, images, prompts[i: i + batch_size],
                                                        max_new_tokens=8)):
            rows.append({"category": q["category"], "question": q["question"], "expected": q["answer"],
                         "answer": text, "predicted": pope_answer(text)})
    return {"metrics": pope_metrics(rows), "rows": rows}


# ------------------------------------------------------------------------------------------- free form
def content_words(text: str) -> list[str]:
    """Lower case, punctuation removed, digits as words, stop words removed."""
    words = re.findall(r"[a-z0-9']+", text.lower())
    words = [_NUMBERS.get(w, w).strip("'") for w in words]
    return [w for w in words if w and w not in STOP_WORDS]


def judge_freeform(predicted: str, reference: str, threshold: float = 0.5) -> dict:
    """The free-form rule: correct when the prediction contains >= `threshold` of the reference's content words.

    Returns {"recall", "precision", "f1", "correct"} over *distinct* content words."""
    ref, pred = set(content_words(reference)), set(content_words(predicted))
    common = len(ref & pred)
    recall = common / len(ref) if ref else float(not pred)
    precision = common / len(pred) if pred else float(not ref)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"recall": recall, "precision": precision, "f1": f1, "correct": recall >= threshold}


def freeform_jobs(records, n: int) -> list[dict]:
    """The first `n` question turns of held-out conversations, each with the gold history before it."""
    jobs = []
    for r in records:
        history = []
        for k in range(0, len(r.messages) - 1, 2):
            user, assistant = r.messages[k], r.messages[k + 1]
            question = user["content"].split("\n", 1)[-1] if k == 0 else user["content"]
            jobs.append({"image": r.image, "history": list(history), "question": question,
                         "reference": assistant["content"]})
            history += [user, assistant]
            if len(jobs) >= n:
                return jobs
    return jobs


def evaluate_freeform(model, processor, records, n: int, max_new_tokens: int = 128, batch_size: int | None = None,
                      progress: bool = True) -> dict:
    """Answer `n` held-out free-form questions and judge them with :func:`judge_freeform`."""
    from tqdm.auto import tqdm

    from .inference import generate_answers, generation_batch_size

    eos = processor.tokenizer.eos_token
    jobs = freeform_jobs(records, n)
    prompts = [prompt_for_next_answer(j["history"], j["question"], eos) for j in jobs]
    if batch_size is None:
        longest = max((len(processor.tokenizer(p)["input_ids"]) for p in prompts), default=0)
        batch_size = generation_batch_size(model, longest + getattr(model.config, "image_seq_length", 0)
                                           + max_new_tokens)
    rows = []
    for i in tqdm(range(0, len(jobs), batch_size), desc="free-form answers", disable=not progress):
        chunk = jobs[i: i + batch_size]
        images = [Image.open(j["image"]).convert("RGB") for j in chunk]
        answers = generate_answers(model, processor, images, prompts[i: i + batch_size], max_new_tokens)
        for job, (text, ended) in zip(chunk, answers):
            rows.append({"image": job["image"].name, "question": job["question"], "reference": job["reference"],
                         "predicted": text, "eos": ended, **judge_freeform(text, job["reference"])})
    n_rows = max(1, len(rows))
    return {"judged_correct": sum(r["correct"] for r in rows) / n_rows,
            "content_f1": sum(r["f1"] for r in rows) / n_rows,
            "content_recall": sum(r["recall"] for r in rows) / n_rows,
            "eos_rate": sum(r["eos"] for r in rows) / n_rows, "n": len(rows), "rows": rows}


# ------------------------------------------------------------------------------------------------ display
def show_scores(metrics: dict, figures_dir=None) -> None:
    """Notebook 03's scores: exact match per question type (tiny world), or the free-form rule and POPE (full)."""
    from pathlib import Path

    from . import reporting

    figures_dir = Path(figures_dir) if figures_dir is not None else None
    if "heldout_accuracy" in metrics:
        from .inference import plot_accuracy

        plot_accuracy(metrics["heldout_accuracy_by_type"], metrics["heldout_accuracy"],
                      figures_dir / "03_accuracy.png" if figures_dir else None)
        print(f"overall exact match: {metrics['heldout_accuracy']:.1%} on {metrics['n_heldout_questions']} "
              f"questions; answers ending with EOS: {metrics['eos_rate']:.1%}")
        blind = metrics.get("blind_accuracy_by_type", {})
        reporting.show_table([{"type": t, "accuracy": f"{a:.1%}", "blind (blank image)": f"{blind[t]:.1%}" if t in blind
                               else "-", "questions": metrics["heldout_questions_by_type"][t]}
                              for t, a in metrics["heldout_accuracy_by_type"].items()])
        if blind:
            print(f"blind (every image replaced by a blank one): {metrics['blind_accuracy']:.1%} overall. What the "
                  "model answers blind comes from the question's words alone; the gap is what it reads from the image.")
    if "freeform_n" in metrics:
        print(f"free-form answers ({metrics['freeform_n']} held-out questions): judged correct "
              f"{metrics['freeform_judged_correct']:.1%} (content-word recall >= 0.5), mean content-word F1 "
              f"{metrics['freeform_content_f1']:.2f}, answers ending with EOS {metrics['freeform_eos_rate']:.1%}")
    if "pope" in metrics:
        rows = [{"split": split, **{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in scores.items()}}
                for split, scores in metrics["pope"].items()]
        print("POPE (object hallucination; F1 of 'yes'; TinyLLaVA's Phi-2 model reports 86.8 F1):")
        reporting.show_table(rows, ["split", "accuracy", "precision", "recall", "f1", "yes_ratio", "n"])


def sample_table(rows: list[dict], n: int = 12, n_wrong: int = 8) -> None:
    """Some answers and some mistakes, with the columns the rows have."""
    from . import reporting

    if not rows:
        print("no held-out answers")
        return
    wrong = [r for r in rows if not r.get("correct", True)]
    exact = "type" in rows[0]
    columns = (["image", "type", "question", "expected", "predicted", "correct"] if exact else
               ["image", "question", "reference", "predicted", "recall", "correct"])
    reporting.show_table(rows[:n] + wrong[:n_wrong], columns)
