"""The synthetic world of the tiny profile: coloured shapes on a 2x2 grid.

Every scene has 1-3 objects, each in its own grid cell, each of a different colour. From a scene the module
derives everything the course needs, in the real data sets' formats:

* an image (JPEG, like COCO's),
* captions (COCO 2017 captions JSON),
* multi-turn conversations whose short answers can be scored exactly (LLaVA-Instruct JSON with ``<image>``),
* a plain-text pretraining corpus (scene descriptions followed by questions and answers about them).

All of it is deterministic from a seed; the held-out split uses a disjoint seed stream and is never trained on.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 215),
    "yellow": (230, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four"}
QUESTION_TYPES = ("colour", "shape", "position", "count", "yes/no", "follow-up")


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    cell: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]

    def by_cell(self) -> list[Thing]:
        return sorted(self.things, key=lambda t: CELLS.index(t.cell))

    def to_dict(self) -> dict:
        return {"things": [asdict(t) for t in self.by_cell()]}

    @staticmethod
    def from_dict(data: dict) -> "Scene":
        return Scene(tuple(Thing(**t) for t in data["things"]))


def sample_scene(rng: random.Random) -> Scene:
    n = rng.randint(1, 3)
    cells = rng.sample(CELLS, n)
    colours = rng.sample(list(COLOURS), n)
    return Scene(tuple(Thing(c, rng.choice(SHAPES), cell) for c, cell in zip(colours, cells)))


# ----------------------------------------------------------------------------------------------- images
def render(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    """Draw the scene: light noisy background, one shape per occupied cell with jittered size and place."""
    bg = tuple(rng.randint(225, 250) for _ in range(3))
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    half = size // 2
    for thing in scene.things:
        row, col = divmod(CELLS.index(thing.cell), 2)
        extent = rng.uniform(0.62, 0.85) * half
        cx = col * half + half / 2 + rng.uniform(-1, 1) * (half - extent) / 2
        cy = row * half + half / 2 + rng.uniform(-1, 1) * (half - extent) / 2
        box = (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)
        colour = tuple(min(255, max(0, v + rng.randint(-15, 15))) for v in COLOURS[thing.colour])
        if thing.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif thing.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour)
    return image


# ------------------------------------------------------------------------------------------------- text
def caption(scene: Scene) -> str:
    things = scene.by_cell()
    n = len(things)
    parts = [f"a {t.name} at the {t.cell}" for t in things]
    listed = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    noun = "object" if n == 1 else "objects"
    return f"{NUMBER_WORDS[n]} {noun}: {listed}."


def _plural(shape: str) -> str:
    return shape + "s"


def ask(scene: Scene, qtype: str, rng: random.Random, previous: Thing | None = None, asked_about: str = ""):
    """One (question, answer, referent) of the given type, or None when the scene cannot support it."""
    things = list(scene.things)
    if qtype == "colour":
        unique = [t for t in things if sum(u.shape == t.shape for u in things) == 1]
        if not unique:
            return None
        t = rng.choice(unique)
        return f"What colour is the {t.shape}?", t.colour, t
    if qtype == "shape":
        t = rng.choice(things)
        return f"What shape is the {t.colour} object?", t.shape, t
    if qtype == "position":
        t = rng.choice(things)
        return f"Where is the {t.name}?", t.cell, t
    if qtype == "count":
        if rng.random() < 0.5:
            return "How many objects are there?", NUMBER_WORDS[len(things)], None
        shape = rng.choice(SHAPES)
        k = sum(t.shape == shape for t in things)
        return f"How many {_plural(shape)} are there?", NUMBER_WORDS[k], None
    if qtype == "yes/no":
        if rng.random() < 0.5:
            t = rng.choice(things)
            return f"Is there a {t.name}?", "yes", t
        present = {(t.colour, t.shape) for t in things}
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        # prefer hard negatives: the colour or the shape is in the picture, the pair is not
        hard = [p for p in absent if any(p[0] == t.colour or p[1] == t.shape for t in things)]
        c, s = rng.choice(hard or absent)
        return f"Is there a {c} {s}?", "no", None
    if qtype == "follow-up":
        if previous is None:
            return None
        if asked_about == "position" or (asked_about != "colour" and rng.random() < 0.5):
            return "And what colour is it?", previous.colour, previous
        return "Where is it?", previous.cell, previous
    raise ValueError(f"unknown question type {qtype!r}")


def conversation(scene: Scene, rng: random.Random, turns: int) -> list[dict]:
    """A multi-turn conversation: a list of {question, answer, type}. Follow-ups refer to the previous turn."""
    out: list[dict] = []
    previous: Thing | None = None
    base_types = [t for t in QUESTION_TYPES if t != "follow-up"]
    while len(out) < turns:
        qtype = "follow-up" if previous is not None and rng.random() < 0.35 else rng.choice(base_types)
        asked = ask(scene, qtype, rng, previous, out[-1]["type"] if out else "")
        if asked is None:
            continue
        question, answer, referent = asked
        if any(q["question"] == question for q in out):
            continue
        out.append({"question": question, "answer": answer, "type": qtype})
        previous = referent if qtype != "follow-up" else None
    return out


def to_llava_conversations(turns: list[dict]) -> list[dict]:
    """LLaVA-Instruct layout: alternating human/gpt messages, ``<image>`` in the first human message."""
    messages = []
    for i, turn in enumerate(turns):
        value = ("<image>\n" if i == 0 else "") + turn["question"]
        messages.append({"from": "human", "value": value})
        messages.append({"from": "gpt", "value": turn["answer"]})
    return messages


CAPTION_REQUEST = "Describe the image briefly."


def corpus_document(scene: Scene, rng: random.Random, turns: int, eos: str) -> str:
    """Clean pretraining text: a dialogue in the chat layout that first describes a scene in words, then answers
    questions about it. The LM learns the language of the world and to answer from a description; the later
    stages only have to put the description into image tokens."""
    from .chat_template import render_text_dialogue

    dialogue = [{"question": CAPTION_REQUEST, "answer": caption(scene)}] + conversation(scene, rng, turns)
    return render_text_dialogue(dialogue, eos)


# ------------------------------------------------------------------------------------------------ files
@dataclass
class WorldFiles:
    root: Path

    @property
    def corpus(self) -> Path:
        return self.root / "corpus.txt"

    def images(self, split: str) -> Path:
        return self.root / f"{split}2017"

    def captions(self, split: str) -> Path:
        return self.root / "annotations" / f"captions_{split}2017.json"

    def instruct(self, split: str) -> Path:
        return self.root / f"llava_instruct_{split}.json"

    def scenes(self, split: str) -> Path:
        return self.root / f"scenes_{split}.json"

    def complete(self) -> bool:
        return all(p.exists() for p in [self.corpus, self.captions("train"), self.captions("val"),
                                        self.instruct("train"), self.instruct("val"), self.root / "DONE"])


def _write_split(files: WorldFiles, split: str, n: int, seed: int, image_size: int, turns: int,
                 progress: bool) -> None:
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    folder = files.images(split)
    folder.mkdir(parents=True, exist_ok=True)
    files.captions(split).parent.mkdir(parents=True, exist_ok=True)
    images, annotations, records, scenes = [], [], [], {}
    offset = 1 if split == "train" else 500_000  # disjoint COCO-style ids
    for k in tqdm(range(n), desc=f"world {split}", disable=not progress):
        image_id = offset + k
        file_name = f"{image_id:012d}.jpg"
        scene = sample_scene(rng)
        render(scene, image_size, rng).save(folder / file_name, quality=95)
        images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption(scene)})
        turns_ = conversation(scene, rng, turns)
        records.append({"id": f"{image_id:012d}", "image": file_name,
                        "conversations": to_llava_conversations(turns_),
                        "question_types": [t["type"] for t in turns_]})
        scenes[file_name] = scene.to_dict()
    coco = {"info": {"description": f"mmphi synthetic world ({split})", "version": "1.0"},
            "licenses": [], "images": images, "annotations": annotations}
    files.captions(split).write_text(json.dumps(coco))
    files.instruct(split).write_text(json.dumps(records))
    files.scenes(split).write_text(json.dumps(scenes))


def build_world(root: str | Path, spec, eos: str = "<|endoftext|>", progress: bool = True,
                force: bool = False) -> WorldFiles:
    """Generate (or reuse) the synthetic world under `root`. Returns the file locations."""
    files = WorldFiles(Path(root))
    if files.complete() and not force:
        return files
    files.root.mkdir(parents=True, exist_ok=True)
    _write_split(files, "train", spec.n_train_images, spec.seed * 1000 + 1, spec.image_size,
                 spec.turns_per_conversation, progress)
    _write_split(files, "val", spec.n_heldout_images, spec.seed * 1000 + 2, spec.image_size,
                 spec.turns_per_conversation, progress)
    rng = random.Random(spec.seed * 1000 + 3)
    docs = [corpus_document(sample_scene(rng), rng, spec.turns_per_conversation, eos)
            for _ in range(spec.n_corpus_scenes)]
    files.corpus.write_text("\n".join(docs) + "\n")
    (files.root / "DONE").write_text("ok\n")
    return files


def preview(files: WorldFiles, n: int = 6, split: str = "train"):
    """Show the first `n` images of a split with their captions (inline in a notebook)."""
    import matplotlib.pyplot as plt

    coco = json.loads(files.captions(split).read_text())
    captions = {a["image_id"]: a["caption"] for a in coco["annotations"]}
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n, 2.9))
    for ax, img in zip(axes, coco["images"][:n]):
        ax.imshow(Image.open(files.images(split) / img["file_name"]))
        ax.set_title(_wrap(captions[img["id"]], 26), fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    plt.show()


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
