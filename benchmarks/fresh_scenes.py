"""How a finished tiny run answers about scenes it has never seen, outside the held-out split.

For each run folder of ``benchmarks/seeds.py`` (``<output>/world<W>_seed<S>``, with its ``result.json`` and
``tiny/`` outputs) the merged stage-03 assistant answers two sets of fresh scenes of the run's world, drawn from
seed streams of their own (``world_seed * 1000 + 55`` and ``+ 77``; the course uses ``+ 1`` to ``+ 4``):

* **all types**: 300 scenes with 3-turn conversations, every question type equally likely (as the held-out split),
  with the run's share of two-kind scenes and their binding questions;
* **yes/no colour, every pair**: 150 one-kind scenes, each asked about every colour of the world ("Is the colour
  red?" in the world's wording), so a colour pair the model confuses shows up whole instead of as a few held-out misses.

The held-out split is never read: this is the set to judge recipe changes on.

    python benchmarks/fresh_scenes.py outputs/seeds/world1_seed0 outputs/seeds/world1_seed1
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ALL_TYPES_SCENES, ALL_TYPES_STREAM = 300, 55
PAIRS_SCENES, PAIRS_STREAM = 150, 77


def all_types_records(world_seed: int, folder: Path, two_kind_share: float = 0.0):
    from helpers.config import TINY
    from helpers.data.multimodal_data import read_llava_instruct
    from helpers.data.world import WorldFiles, vocabulary, write_split

    files = WorldFiles(folder)
    if not files.instruct("val").exists():
        write_split(files, "val", ALL_TYPES_SCENES, world_seed * 1000 + ALL_TYPES_STREAM, TINY.world.image_size,
                    TINY.world.turns_per_conversation, False, vocabulary(world_seed, two_kind_share))
    return read_llava_instruct(files.instruct("val"), files.images("val"))[0]


def colour_pair_records(world_seed: int, folder: Path):
    """Every colour asked about on every scene; returns (records, [(true colour, asked colour)] per record)."""
    from helpers.config import TINY
    from helpers.data.multimodal_data import read_llava_instruct
    from helpers.data.world import render, sample_scene, to_llava_conversations, vocabulary

    vocab = vocabulary(world_seed)
    rng = random.Random(world_seed * 1000 + PAIRS_STREAM)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    raw, pairs = [], []
    for k in range(PAIRS_SCENES):
        scene = sample_scene(rng, vocab)
        name = f"{900_000 + k:012d}.jpg"
        image = render(scene, TINY.world.image_size, rng, vocab)
        if not (folder / "images" / name).exists():
            image.save(folder / "images" / name, quality=95)
        for colour in vocab.colour_names:
            turn = {"question": vocab.say("yn_colour", colour=colour), "type": "yes/no",
                    "answer": "yes" if colour == scene.colour else "no"}
            raw.append({"id": f"{k}-{colour}", "image": name, "conversations": to_llava_conversations([turn]),
                        "question_types": ["yes/no"]})
            pairs.append((scene.colour, colour))
    (folder / "questions.json").write_text(json.dumps(raw))
    return read_llava_instruct(folder / "questions.json", folder / "images")[0], pairs


def check_run(run: Path, cache: Path) -> dict:
    from helpers.models.inference import evaluate_conversations, load_assistant

    result = json.loads((run / "result.json").read_text())
    world_seed, share = result["world_seed"], result.get("world", {}).get("two_kind_share", 0.0)
    model, processor = load_assistant(run / "tiny" / "03_qlora_instruct" / "merged")
    all_types = cache / (f"w{world_seed}-all" if not share else f"w{world_seed}-two-kinds-{share:g}-all")
    everything = evaluate_conversations(model, processor, all_types_records(world_seed, all_types, share),
                                        progress=False)
    records, pairs = colour_pair_records(world_seed, cache / f"w{world_seed}-pairs")
    colour = evaluate_conversations(model, processor, records, progress=False)
    wrong, asked = Counter(), Counter()
    for pair, row in zip(pairs, colour["rows"]):
        asked[pair] += 1
        wrong[pair] += not row["correct"]
    return {"run": run.name, "world_seed": world_seed, "all_types_accuracy": everything["accuracy"],
            "all_types_by_type": everything["accuracy_by_type"], "eos_rate": everything["eos_rate"],
            "yes_no_colour_accuracy": colour["accuracy"],
            "confused_pairs": [{"true": t, "asked": a, "wrong": wrong[(t, a)], "of": asked[(t, a)]}
                               for t, a in sorted(asked) if wrong[(t, a)]]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of benchmarks/seeds.py")
    parser.add_argument("--cache", type=Path, default=ROOT / "outputs" / "fresh_scenes",
                        help="where the fresh scenes are written (once per world)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    for run in args.runs:
        r = check_run(run, args.cache)
        results.append(r)
        types = ", ".join(f"{t} {100 * v:.1f}" for t, v in sorted(r["all_types_by_type"].items()))
        print(f"{r['run']}: all types {100 * r['all_types_accuracy']:.1f} % ({types}); EOS "
              f"{100 * r['eos_rate']:.1f} %; yes/no colour, every pair {100 * r['yes_no_colour_accuracy']:.1f} %")
        for p in r["confused_pairs"]:
            print(f"   a {p['true']} scene asked about {p['asked']}: {p['wrong']} of {p['of']} wrong")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
