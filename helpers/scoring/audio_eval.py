"""Notebook 04's measurement: the held-out questions asked by voice instead of typed.

Each held-out question is spoken (espeak-ng), transcribed (Whisper) and asked in the very same chat template;
the history of a conversation holds the earlier *spoken* questions and the gold answers, exactly as the typed
evaluation holds the typed questions and the gold answers. The same records, the same images, the same scoring:
only the question text differs, so the accuracy gap is the cost of speech recognition.

WAVs and transcripts are cached under ``outputs/<profile>/audio/``; a sentence that occurs many times (the
synthetic world has a few dozen distinct questions) is synthesised and transcribed once.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from helpers.data.chat_template import IMAGE_TOKEN, user_message
from helpers.data.multimodal_data import Record
from helpers.models import asr as speech
from helpers.models.inference import evaluate_conversations
from helpers.scoring.evaluation import judge_freeform
from helpers.views import reporting


def typed_question(message: dict) -> str:
    return message["content"].replace(IMAGE_TOKEN, "").strip()


def limit_records(records: list[Record], max_questions: int | None) -> list[Record]:
    """Conversations in order, up to `max_questions` questions in all; the last one is cut after its first turns
    when it does not fit whole (a conversation's first turns never depend on its later ones)."""
    if max_questions is None:
        return list(records)
    out, n = [], 0
    for r in records:
        if n >= max_questions:
            break
        k = min(len(r.messages) // 2, max_questions - n)
        types = r.meta.get("types")
        meta = {**r.meta, "types": types[:k]} if types else r.meta
        out.append(r if 2 * k == len(r.messages) else Record(r.image, r.messages[: 2 * k], meta))
        n += k
    return out


def unique_questions(records: list[Record]) -> list[str]:
    seen = {}
    for r in records:
        for m in r.messages:
            if m["role"] == "user":
                seen.setdefault(typed_question(m), None)
    return list(seen)


def _key(*parts) -> str:
    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()[:16]


def synthesize_questions(questions: list[str], audio_dir: Path, progress: bool = True) -> dict[str, Path]:
    """One WAV per distinct question (cached by text and voice settings)."""
    from tqdm.auto import tqdm

    folder = Path(audio_dir) / "wav"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    settings = (speech.ESPEAK_VOICE, speech.ESPEAK_SPEED, speech.ESPEAK_WORD_GAP)
    for q in tqdm(questions, desc="speaking questions (espeak-ng)", disable=not progress):
        path = folder / f"{_key(q, *settings)}.wav"
        if not path.exists():
            speech.synthesize(q, path)
        out[q] = path
    return out


def transcribe_questions(asr, wavs: dict[str, Path], audio_dir: Path, progress: bool = True) -> dict[str, str]:
    """Whisper's transcript of every WAV (cached per recogniser and WAV content in transcripts.json)."""
    from tqdm.auto import tqdm

    cache_file = Path(audio_dir) / "transcripts.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    mine = cache.setdefault(asr.name, {})
    out = {}
    for q, path in tqdm(wavs.items(), desc=f"transcribing ({asr.name})", disable=not progress):
        key = hashlib.sha1(Path(path).read_bytes()).hexdigest()[:16]
        if key not in mine:
            mine[key] = asr.transcribe(path)
        out[q] = mine[key]
    cache_file.write_text(json.dumps(cache, indent=1, sort_keys=True))
    return out


def spoken_records(records: list[Record], transcripts: dict[str, str]) -> list[Record]:
    """The same conversations with every user turn replaced by what Whisper heard (tidied like a typed
    question); answers stay gold. ``meta["typed"]`` keeps the original questions."""
    out = []
    for r in records:
        messages, typed = [], []
        for i, m in enumerate(r.messages):
            if m["role"] != "user":
                messages.append(dict(m))
                continue
            q = typed_question(m)
            typed.append(q)
            asked = speech.transcript_to_question(transcripts[q]) or "..."  # an empty transcript stays a turn
            messages.append(user_message(asked, with_image=i == 0))
        out.append(Record(r.image, messages, {**r.meta, "typed": typed}))
    return out


def asr_rows(records: list[Record], transcripts: dict[str, str]) -> list[dict]:
    """One row per question occurrence: typed text, raw transcript, errors (raw and normalised)."""
    rows = []
    for r in records:
        types = r.meta.get("types") or []
        for k, m in enumerate(m for m in r.messages if m["role"] == "user"):
            q = typed_question(m)
            raw_e, raw_n = speech.word_errors(q, transcripts[q], "raw")
            basic_e, basic_n = speech.word_errors(q, transcripts[q], "basic")
            norm_e, norm_n = speech.word_errors(q, transcripts[q], "normalised")
            rows.append({"type": types[k] if k < len(types) else "open", "typed": q,
                         "transcript": transcripts[q], "asked": speech.transcript_to_question(transcripts[q]),
                         "raw_errors": raw_e, "raw_words": raw_n,
                         "basic_errors": basic_e, "basic_words": basic_n, "errors": norm_e, "words": norm_n})
    return rows


def wer_summary(rows: list[dict]) -> dict:
    by_type = defaultdict(lambda: [0, 0])
    for r in rows:
        by_type[r["type"]][0] += r["errors"]
        by_type[r["type"]][1] += r["words"]
    unique = {r["typed"]: r for r in rows}.values()
    return {
        "wer_raw": sum(r["raw_errors"] for r in rows) / max(1, sum(r["raw_words"] for r in rows)),
        "wer_basic": sum(r["basic_errors"] for r in rows) / max(1, sum(r["basic_words"] for r in rows)),
        "wer": sum(r["errors"] for r in rows) / max(1, sum(r["words"] for r in rows)),
        "wer_unique_sentences": sum(r["errors"] for r in unique) / max(1, sum(r["words"] for r in unique)),
        "sentences_exact": sum(r["errors"] == 0 for r in rows) / max(1, len(rows)),
        "wer_by_type": {t: e / max(1, n) for t, (e, n) in sorted(by_type.items())},
    }


@dataclass
class TypedVsSpoken:
    metrics: dict  # what metrics/04_audio.json holds
    samples: list  # one row per question: what was heard and asked, both answers


def typed_vs_spoken(profile, paths, val_records, model, processor, asr=None, max_questions: int | None = -1,
                    progress: bool = True) -> TypedVsSpoken:
    """Speak, transcribe and answer the held-out questions (of `val_records`, the held-out conversations) with the
    exported assistant (`model`, `processor`); compare with the same questions typed.

    Writes ``metrics/04_audio.json`` and ``metrics/04_spoken_answers.json``. Returns the metrics and
    the rows with both answers."""
    start = time.perf_counter()
    if max_questions == -1:
        # Profile.n_audio_questions (tiny: all 900 held-out questions, made of a few dozen distinct sentences;
        # full: 60 open-ended LLaVA questions, each one synthesised and transcribed)
        max_questions = profile.n_audio_questions
    asr = asr or speech.load_asr(profile)  # ASRUnavailable says what to install
    audio_dir = paths.root / "audio"
    records = limit_records(val_records[: profile.n_eval_samples], max_questions)
    questions = unique_questions(records)
    t0 = time.perf_counter()
    wavs = synthesize_questions(questions, audio_dir, progress)
    t1 = time.perf_counter()
    transcripts = transcribe_questions(asr, wavs, audio_dir, progress)
    t2 = time.perf_counter()
    judge = None
    if not all(r.meta.get("types") for r in records):  # free-form answers (full): the documented rule
        def judge(predicted, expected):
            return judge_freeform(predicted, expected)["correct"]
    typed = evaluate_conversations(model, processor, records, max_new_tokens=profile.max_new_tokens,
                                   progress=progress, judge=judge)
    spoken = evaluate_conversations(model, processor, spoken_records(records, transcripts),
                                    max_new_tokens=profile.max_new_tokens, progress=progress, judge=judge)
    table = asr_rows(records, transcripts)
    rows = []
    for a, t, s in zip(table, typed["rows"], spoken["rows"]):
        rows.append({"image": t["image"], "type": a["type"], "typed": a["typed"], "transcript": a["transcript"],
                     "asked": a["asked"], "word_errors": a["errors"], "expected": t["expected"],
                     "typed_answer": t["predicted"], "spoken_answer": s["predicted"],
                     "typed_correct": t["correct"], "spoken_correct": s["correct"]})
    summary = wer_summary(table)
    metrics = {
        "asr": asr.name, "tts": f"espeak-ng -v {speech.ESPEAK_VOICE} -s {speech.ESPEAK_SPEED} "
                                f"-g {speech.ESPEAK_WORD_GAP}",
        "n_questions": len(rows), "n_conversations": len(records), "n_distinct_sentences": len(questions),
        **summary,
        "typed_accuracy": typed["accuracy"], "spoken_accuracy": spoken["accuracy"],
        "spoken_minus_typed_points": 100 * (spoken["accuracy"] - typed["accuracy"]),
        "typed_accuracy_by_type": typed["accuracy_by_type"], "spoken_accuracy_by_type": spoken["accuracy_by_type"],
        "questions_by_type": typed["count_by_type"], "spoken_eos_rate": spoken["eos_rate"],
        "synthesis_seconds": t1 - t0, "transcription_seconds": t2 - t1, "seconds": time.perf_counter() - start,
    }
    reporting.write_metrics(paths.metrics, "04_audio", metrics)
    (paths.metrics / "04_spoken_answers.json").write_text(json.dumps(rows, indent=1, default=str))
    return TypedVsSpoken(metrics, rows)


def plot_typed_vs_spoken(metrics: dict, path=None):
    """Accuracy per question type, typed vs spoken (bars), with the normalised WER per type on a second axis."""
    import matplotlib.pyplot as plt
    import numpy as np

    types = list(metrics["typed_accuracy_by_type"])
    x = np.arange(len(types))
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ax.bar(x - 0.2, [100 * metrics["typed_accuracy_by_type"][t] for t in types], 0.4, label="typed",
           color="#4c72b0")
    ax.bar(x + 0.2, [100 * metrics["spoken_accuracy_by_type"][t] for t in types], 0.4, label="spoken",
           color="#dd8452")
    ax.set_xticks(x, types)
    ax.set_ylim(0, 100)
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title(f"typed {metrics['typed_accuracy']:.1%} vs spoken {metrics['spoken_accuracy']:.1%} "
                 f"(WER {metrics['wer']:.1%})")
    wer_ax = ax.twinx()
    wer_ax.plot(x, [100 * metrics["wer_by_type"].get(t, 0) for t in types], "k.--", label="WER (normalised)")
    wer_ax.set_ylim(0, max(20, 100 * max(metrics["wer_by_type"].values(), default=0) * 1.2))
    wer_ax.set_ylabel("word error rate (%)")
    handles = ax.get_legend_handles_labels()
    more = wer_ax.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], loc="upper right", fontsize=8)
    fig.tight_layout()
    return reporting.save_and_show(fig, path)
