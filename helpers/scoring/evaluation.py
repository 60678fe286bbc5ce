"""Evaluation that means something at full scale: POPE and judged free-form answers.

Exact match is the right score for the tiny world (short answers from a closed vocabulary) and meaningless for
LLaVA-Instruct's free-form answers. In the full profile stage 03 therefore reports:

* **POPE** (Li et al., 2023; ``lmms-lab/POPE``): "Is there a <object> in the image?" on COCO images, in three
  categories (random, popular and adversarial absent objects). An answer counts as **no** when its words include
  "no" or "not", else as **yes** (the POPE paper's rule). Reported per category and overall: accuracy, precision,
  recall and F1 of "yes", and the yes-ratio (a model that always says yes has F1 66.7 and yes-ratio 1.0).
  TinyLLaVA's Phi-2 + CLIP-L/336 model reports F1 86.8; LLaVA-Instruct alone scores well below such recipes.
  The same questions are asked blind (blank images) beside the real ones, and POPE's images are removed from the
  training data of stages 02 and 03 first (``helpers.stages.drop_pope_images``): most are COCO train2017 images.
* **Free-form answers**, judged by one documented rule (:func:`judge_freeform`): both answers are normalised
  (lower case, punctuation removed, numbers as words), reduced to content words (a fixed stop-word list removed),
  and the prediction is *correct* when it contains at least half of the reference's content words (content-word
  recall >= 0.5). Content-word F1 is reported beside it. The rule rewards naming what the reference names, not
  phrasing; it cannot tell a true statement from a false one that uses the same words: read the samples.

* **MMStar** (Chen et al., 2024; ``Lin-Chen/MMStar``): four-option questions that need the image, in six categories,
  with the standard instruction "Answer with the option's letter from the given choices directly." Scored two ways
  (:func:`evaluate_mmstar`): by the **generated letter** (the headline: how lmms-eval's and VLMEvalKit's MMStar
  tasks score, so it is the figure the published ones are) and by the **likelihood** of each option letter as the
  next token (a model tuned on free-form conversations may know the answer and still not reply with a letter).
  Chance is 25 %; the same questions with a blank image (blind) are reported beside.

Questions are asked with the course's one chat template; POPE adds LLaVA-1.5's short-answer instruction.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict

from PIL import Image

from helpers.data.chat_template import prompt_for_next_answer
from helpers.data.hub_data import mmstar_questions, pope_questions
from helpers.data.world import blind_chance_by_type, world_vocabulary
from helpers.models.inference import (
    blank_like,
    evaluate_conversations,
    generate_answers,
    generation_batch_size,
    left_padding,
    plot_accuracy,
)
from helpers.views import reporting

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
                  progress: bool = True, blind: bool = False) -> dict:
    """Ask every POPE question (``{"question", "answer", "category", "image"}``) and score the answers.

    blind: every image replaced by a blank one (``helpers.models.inference.blank_like``), the baseline the real score is
    read against: what a model says blind comes from the question's words alone."""
    from tqdm.auto import tqdm

    eos = processor.tokenizer.eos_token
    prompts = [prompt_for_next_answer([], q["question"] + POPE_SUFFIX, eos) for q in questions]
    if batch_size is None:
        longest = max((len(processor.tokenizer(p)["input_ids"]) for p in prompts), default=0)
        batch_size = generation_batch_size(model, longest + getattr(model.config, "image_seq_length", 0) + 8)
    rows = []
    for i in tqdm(range(0, len(questions), batch_size), desc="POPE" + (" blind" if blind else ""),
                  disable=not progress):
        chunk = questions[i: i + batch_size]
        images = [Image.open(q["image"]).convert("RGB") for q in chunk]
        images = [blank_like(im) for im in images] if blind else images
        for q, (text, _) in zip(chunk, generate_answers(model, processor, images, prompts[i: i + batch_size],
                                                        max_new_tokens=8)):
            rows.append({"category": q["category"], "question": q["question"], "expected": q["answer"],
                         "answer": text, "predicted": pope_answer(text), "blind": blind})
    return {"metrics": pope_metrics(rows), "rows": rows}


# ----------------------------------------------------------------------------------------------- MMStar
MMSTAR_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
MMSTAR_LETTERS = ("A", "B", "C", "D")
MMSTAR_CHANCE = 0.25
# The headline is the generated letter: lmms-eval's mmstar task generates (generate_until) and compares the answer's
# first character with the letter, as MMStar's own code (VLMEvalKit) does, so published MMStar scores are of this kind.
MMSTAR_HEADLINE = "generated_letter"


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def mmstar_options(question: str) -> dict[str, str]:
    """The options written in an MMStar question (``...\\nOptions: A: x, B: y, C: z, D: w``) as {letter: text}."""
    _, found, tail = question.rpartition("Options:")
    parts = re.split(r"(?:^|,)\s*([A-D]):\s*", tail) if found else []
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}


def mmstar_letter(answer: str, options: dict[str, str] | None = None) -> str | None:
    """The option a generated answer picks: its first standalone letter A-D ("B", "(B)", "B.", "The answer is B";
    "A" as the article opening a sentence, "A man ...", is not a letter), else the one option whose text its words
    contain; None when neither (counted wrong)."""
    for match in re.finditer(r"(?<![A-Za-z])([A-D])(?![A-Za-z])", answer):
        before = answer[: match.start()].rstrip()
        if match.group(1) == "A" and re.match(r" [a-z]", answer[match.end():]) and (not before or before[-1] in ".!?"):
            continue
        return match.group(1)
    said = f" {_words(answer)} "
    hits = [k for k, text in (options or {}).items() if _words(text) and f" {_words(text)} " in said]
    return hits[0] if len(hits) == 1 else None


def letter_token_ids(tokenizer) -> dict[str, list[int]]:
    """Each letter's one-token spellings: " A" (how an answer follows "ASSISTANT:" in the training text) and "A"."""
    ids = {}
    for letter in MMSTAR_LETTERS:
        encoded = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in (" " + letter, letter)]
        ids[letter] = sorted({e[0] for e in encoded if len(e) == 1})
        if not ids[letter]:
            raise ValueError(f"the tokenizer spells neither ' {letter}' nor '{letter}' as one token")
    return ids


def letter_logprobs(model, processor, images: list, prompts: list[str], token_ids: dict[str, list[int]]) -> list[dict]:
    """One forward over each (image, prompt): the log-probability of each letter as the next token, a letter taking
    the better of its spellings (" B" or "B": the model may prefer either after "ASSISTANT:")."""
    import torch

    with left_padding(processor.tokenizer):
        inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(model.parameters()).device
    mask = inputs["attention_mask"].to(device)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # left padding: count real tokens only
    pixels = inputs["pixel_values"].to(device, next(base.model.vision_tower.parameters()).dtype)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"].to(device), attention_mask=mask, position_ids=positions,
                       pixel_values=pixels, use_cache=False, logits_to_keep=1).logits[:, -1].float()
    logprobs = torch.log_softmax(logits, dim=-1).cpu()
    return [{k: max(float(row[i]) for i in v) for k, v in token_ids.items()} for row in logprobs]


def mmstar_metrics(rows: list[dict]) -> dict:
    """Accuracy overall and per category by the generated letter and by likelihood, the headline and chance."""
    by_category = defaultdict(list)
    for r in rows:
        by_category[r["category"]].append(r)

    def score(key, rs):
        return sum(r[key] == r["expected"] for r in rs) / max(1, len(rs))

    scores = {name: {"overall": score(key, rows), **{c: score(key, v) for c, v in sorted(by_category.items())}}
              for name, key in (("generated_letter", "generated_letter"), ("likelihood", "likelihood_letter"))}
    return {"headline": MMSTAR_HEADLINE, "headline_accuracy": scores[MMSTAR_HEADLINE]["overall"], **scores,
            "answered_with_a_letter": sum(r["generated_letter"] is not None for r in rows) / max(1, len(rows)),
            "chance": MMSTAR_CHANCE, "n": len(rows),
            "n_by_category": {c: len(v) for c, v in sorted(by_category.items())}}


def evaluate_mmstar(model, processor, questions: list[dict], blind: bool = False, batch_size: int | None = None,
                    max_new_tokens: int = 16, progress: bool = True) -> dict:
    """Ask MMStar questions (``{"question", "answer", "category", "image"}``, the options inside the question) with
    the standard suffix; score the greedy answer's letter (:func:`mmstar_letter`) and the likelier next-token letter
    (:func:`letter_logprobs`). blind: every image replaced by a blank one (``helpers.models.inference.blank_like``)."""
    from tqdm.auto import tqdm

    eos = processor.tokenizer.eos_token
    prompts = [prompt_for_next_answer([], q["question"] + MMSTAR_SUFFIX, eos) for q in questions]
    token_ids = letter_token_ids(processor.tokenizer)
    if batch_size is None:
        longest = max((len(processor.tokenizer(p)["input_ids"]) for p in prompts), default=0)
        batch_size = generation_batch_size(model, longest + getattr(model.config, "image_seq_length", 0)
                                           + max_new_tokens)
    rows = []
    for i in tqdm(range(0, len(questions), batch_size), desc="MMStar" + (" blind" if blind else ""),
                  disable=not progress):
        chunk, chunk_prompts = questions[i: i + batch_size], prompts[i: i + batch_size]
        images = [Image.open(q["image"]).convert("RGB") for q in chunk]
        images = [blank_like(im) for im in images] if blind else images
        answers = generate_answers(model, processor, images, chunk_prompts, max_new_tokens=max_new_tokens)
        scores = letter_logprobs(model, processor, images, chunk_prompts, token_ids)
        for q, (text, _), score in zip(chunk, answers, scores):
            rows.append({"category": q["category"], "question": q["question"], "expected": q["answer"],
                         "answer": text, "generated_letter": mmstar_letter(text, mmstar_options(q["question"])),
                         "likelihood_letter": max(score, key=score.get),
                         "letter_logprobs": {k: round(v, 3) for k, v in score.items()}, "blind": blind})
    return {"metrics": mmstar_metrics(rows), "rows": rows}


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
def evaluate_assistant(model, processor, records, profile, paths) -> tuple[dict, list[dict]]:
    """Score the exported assistant on held-out data as notebook 03 reports it; returns (metrics, answer rows).

    tiny: every held-out question exactly (short answers of known types), then the same questions blind (a blank
    image) with the chance level of each type; full: free-form LLaVA-Instruct answers judged by content words
    (``judge_freeform``), and POPE and MMStar with real and then blank images, when the profile asks for them.
    The answers are written to ``metrics/03_*_answers.json``."""
    metrics, rows = {}, []
    paths.metrics.mkdir(parents=True, exist_ok=True)
    if all(r.meta.get("types") for r in records):  # the tiny world: short answers of known types, exact match
        result = evaluate_conversations(model, processor, records, max_new_tokens=profile.max_new_tokens)
        blind = evaluate_conversations(model, processor, records, max_new_tokens=profile.max_new_tokens, blind=True)
        rows = result["rows"]
        metrics.update(heldout_accuracy=result["accuracy"], heldout_accuracy_by_type=result["accuracy_by_type"],
                       heldout_questions_by_type=result["count_by_type"], eos_rate=result["eos_rate"],
                       n_heldout_questions=result["n_questions"], blind_accuracy=blind["accuracy"],
                       blind_accuracy_by_type=blind["accuracy_by_type"],
                       blind_first_turn_accuracy_by_type=blind["first_turn_accuracy_by_type"],
                       first_turn_count_by_type=blind["first_turn_count_by_type"],
                       first_turn_accuracy_by_type=result["first_turn_accuracy_by_type"],
                       blind_chance_by_type=blind_chance_by_type(world_vocabulary(profile.world)))
    elif profile.n_freeform_questions:  # LLaVA-Instruct: free-form answers, judged by a documented rule
        result = evaluate_freeform(model, processor, records, profile.n_freeform_questions, profile.max_new_tokens)
        rows = result.pop("rows")
        metrics.update({f"freeform_{k}": v for k, v in result.items()})
    if profile.n_pope_questions and profile.pope_dataset:  # real images, then the same questions blind
        questions = pope_questions(profile, paths, profile.n_pope_questions)
        pope = [evaluate_pope(model, processor, questions, blind=blind) for blind in (False, True)]
        metrics["pope"], metrics["pope_blind"] = pope[0]["metrics"], pope[1]["metrics"]
        (paths.metrics / "03_pope_answers.json").write_text(json.dumps(pope[0]["rows"] + pope[1]["rows"], indent=1))
    if profile.n_mmstar_questions and profile.mmstar_dataset:  # real images, then the same questions blind
        questions = mmstar_questions(profile, paths, profile.n_mmstar_questions)
        mmstar = [evaluate_mmstar(model, processor, questions, blind=blind) for blind in (False, True)]
        metrics["mmstar"], metrics["mmstar_blind"] = mmstar[0]["metrics"], mmstar[1]["metrics"]
        (paths.metrics / "03_mmstar_answers.json").write_text(json.dumps(mmstar[0]["rows"] + mmstar[1]["rows"],
                                                                         indent=1))
    (paths.metrics / "03_heldout_answers.json").write_text(json.dumps(rows, indent=1, default=str))
    return metrics, rows


def show_scores(metrics: dict, figures_dir=None) -> None:
    """Notebook 03's scores: exact match per question type (tiny world), or the free-form rule and POPE (full)."""
    from pathlib import Path

    figures_dir = Path(figures_dir) if figures_dir is not None else None
    if "heldout_accuracy" in metrics:
        plot_accuracy(metrics["heldout_accuracy_by_type"], metrics["heldout_accuracy"],
                      figures_dir / "03_accuracy.png" if figures_dir else None)
        print(f"overall exact match: {metrics['heldout_accuracy']:.1%} on {metrics['n_heldout_questions']} "
              f"questions; answers ending with EOS: {metrics['eos_rate']:.1%}")
        blind = metrics.get("blind_accuracy_by_type", {})
        first, blind_first = metrics.get("first_turn_accuracy_by_type", {}), \
            metrics.get("blind_first_turn_accuracy_by_type", {})
        chance = metrics.get("blind_chance_by_type", {})

        def pct(d, t):
            return f"{d[t]:.1%}" if t in d else "-"

        reporting.show_table([{"type": t, "accuracy": f"{a:.1%}", "blind (blank image)": pct(blind, t),
                               "first turns": pct(first, t), "first turns, blind": pct(blind_first, t),
                               "chance (best blind)": pct(chance, t), "questions": metrics["heldout_questions_by_type"][t]}
                              for t, a in metrics["heldout_accuracy_by_type"].items()])
        if blind:
            print(f"blind (every image replaced by a blank one): {metrics['blind_accuracy']:.1%} overall. What the "
                  "model answers blind comes from the words alone; the gap is what it reads from the image. On first "
                  "turns (no history that could give the answer away) the blind score should sit near chance, the best "
                  "any answerer can do from the question's words in this world.")
    if "freeform_n" in metrics:
        print(f"free-form answers ({metrics['freeform_n']} held-out questions): judged correct "
              f"{metrics['freeform_judged_correct']:.1%} (content-word recall >= 0.5), mean content-word F1 "
              f"{metrics['freeform_content_f1']:.2f}, answers ending with EOS {metrics['freeform_eos_rate']:.1%}")
    if "pope" in metrics:
        blind = metrics.get("pope_blind") or {}

        def fmt(v):
            return f"{v:.3f}" if isinstance(v, float) else v

        rows = [{"split": split, **{k: fmt(v) for k, v in scores.items()},
                 **{f"{k} blind": fmt(blind.get(split, {}).get(k, "-")) for k in ("accuracy", "f1", "yes_ratio")}}
                for split, scores in metrics["pope"].items()]
        print("POPE (object hallucination; F1 of 'yes'; TinyLLaVA's Phi-2 model reports 86.8 F1); blind: the same "
              "questions with every image replaced by a blank one:")
        reporting.show_table(rows, ["split", "accuracy", "precision", "recall", "f1", "yes_ratio", "n",
                                    "accuracy blind", "f1 blind", "yes_ratio blind"])
        print("A model that says yes to everything scores F1 ~67 (0.667) on POPE's balanced splits, and a blind model "
              "can only guess from the question's words; the gap to the blind score is what it reads from the image.")
        removed = metrics.get("pope_heldout_removed")
        if removed:
            print(f"POPE's {removed['evaluated_images']} evaluated images were kept out of stage 03's training "
                  f"({removed['images']} images, {removed.get('conversations', 0)} conversations removed; stage 02's "
                  "captions likewise): POPE measures images the model has not been trained on.")
    if "mmstar" in metrics:
        show_mmstar(metrics["mmstar"], metrics.get("mmstar_blind"))


def show_mmstar(real: dict, blind: dict | None = None) -> None:
    """MMStar per category: the generated letter (headline) and the likelier letter, real and blind."""
    blind = blind or {}

    def pct(scores, method, split):
        return f"{scores[method][split]:.1%}" if split in scores.get(method, {}) else "-"

    print(f"MMStar ({real['n']} questions, 4 options, chance {real['chance']:.0%}; headline: the generated letter, "
          f"as lmms-eval scores it; {real['answered_with_a_letter']:.0%} of the answers name an option). TinyLLaVA's "
          "Phi-2 model reports 36.0 %:")
    reporting.show_table([{"category": split, "questions": real["n_by_category"].get(split, real["n"]),
                           "generated letter": pct(real, "generated_letter", split),
                           "blind": pct(blind, "generated_letter", split), "likelihood": pct(real, "likelihood", split),
                           "likelihood, blind": pct(blind, "likelihood", split)}
                          for split in real["generated_letter"]])


def sample_table(rows: list[dict], n: int = 12, n_wrong: int = 8) -> None:
    """Some answers and some mistakes, with the columns the rows have."""
    if not rows:
        print("no held-out answers")
        return
    wrong = [r for r in rows if not r.get("correct", True)]
    exact = "type" in rows[0]
    columns = (["image", "type", "question", "expected", "predicted", "correct"] if exact else
               ["image", "question", "reference", "predicted", "recall", "correct"])
    reporting.show_table(rows[:n] + wrong[:n_wrong], columns)


# ------------------------------------------------------------------------------------------ comparison
# Published scores (%) and training budgets the full profile's scores are read against; sources in 03's markdown.
PUBLISHED = [
    {"model": "TinyLLaVA-3B (Phi-2)", "mmstar": 36.0, "pope_f1": 86.8,
     "budget": "558K or 1.2M captions + 665K instructions, LLM fully fine-tuned",
     "source": "MMStar: arXiv 2403.20330 tables 4-5; POPE: TinyLLaVA, arXiv 2402.14289"},
    {"model": "LLaVA-1.5-7B", "mmstar": 30.3, "pope_f1": 85.9,
     "budget": "558K captions + 665K instructions, about a day on one 8 x A100 node",
     "source": "MMStar: arXiv 2403.20330; POPE: LLaVA-1.5, arXiv 2310.03744"},
    {"model": "random choice / always 'yes'", "mmstar": 24.6, "pope_f1": 66.7,
     "budget": "-", "source": "MMStar: arXiv 2403.20330; POPE: F1 of answering 'yes' to a balanced split"},
]


def _mean_pope_f1(pope: dict | None) -> float | None:
    if not pope:
        return None
    # the published figures average the F1 of POPE's three splits (random, popular, adversarial)
    f1s = [v["f1"] for k, v in pope.items() if k != "overall" and isinstance(v, dict) and "f1" in v]
    return 100 * sum(f1s) / len(f1s) if f1s else None


def _mmstar_headline(mmstar: dict | None) -> float | None:
    if not mmstar:
        return None
    value = mmstar.get("headline_accuracy", mmstar.get("accuracy"))
    return None if value is None else 100 * value


def comparison_rows(metrics: dict) -> list[dict]:
    """This run's MMStar and POPE beside the published models (and blind, where measured)."""
    def fmt(v):
        return "-" if v is None else f"{v:.1f}"

    rows = [{"model": p["model"], "MMStar (%)": fmt(p["mmstar"]), "POPE F1 (%)": fmt(p["pope_f1"]),
             "training budget": p["budget"]} for p in PUBLISHED]
    budget = "stages 02 + 03 on one GPU (the time plan's recipe), LLaVA-Instruct-150K, LoRA on 4-bit Phi-2"
    rows.append({"model": "this run", "MMStar (%)": fmt(_mmstar_headline(metrics.get("mmstar"))),
                 "POPE F1 (%)": fmt(_mean_pope_f1(metrics.get("pope"))), "training budget": budget})
    if metrics.get("mmstar_blind") or metrics.get("pope_blind"):
        rows.append({"model": "this run, blind (blank images)",
                     "MMStar (%)": fmt(_mmstar_headline(metrics.get("mmstar_blind"))),
                     "POPE F1 (%)": fmt(_mean_pope_f1(metrics.get("pope_blind"))), "training budget": "-"})
    return rows


def compare_with_published(metrics: dict) -> None:
    """Notebook 03 (full profile): the comparison table; nothing in the tiny profile (no MMStar or POPE there)."""
    if not (metrics.get("mmstar") or metrics.get("pope")):
        print("no MMStar or POPE scores in this run (tiny profile, or n_mmstar_questions = n_pope_questions = 0)")
        return
    reporting.show_table(comparison_rows(metrics), ["model", "MMStar (%)", "POPE F1 (%)", "training budget"])
    print("Sources in the markdown above. A rehearsal's random weights make its scores meaningless.")
