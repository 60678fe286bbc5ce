"""The synthetic world of the tiny profile: coloured shapes on a 2x2 grid.

A scene of *one kind* shows 1-3 copies of one shape in one colour, each copy in its own grid cell. A scene of *two
kinds* (a share of the scenes set by ``Vocabulary.two_kind_share``) shows two different objects (another colour,
another shape, or both) in two cells, sometimes with a second copy of one of them. From a scene the module derives
everything the course needs, in the real data sets' formats:

* an image (JPEG, like COCO's),
* captions (COCO 2017 captions JSON),
* multi-turn conversations whose short answers can be scored exactly (LLaVA-Instruct JSON with ``<image>``):
  colour, shape, position, count, yes/no, and follow-ups that refer to the previous turn; on two-kind scenes the
  *binding* types, which need the right object found first: attribute ("What colour is the square?"), place
  ("Where is the red square?", "What is in the top left cell?"), relation ("Is the red square left of the blue
  circle?", "What is above the blue circle?"), kind count ("How many red objects are there?") and binding yes/no
  ("Is there a red circle?" when a red square and a blue circle are shown),
* a plain-text pretraining corpus (dialogues that describe a scene, then answer questions about it).

Why two kinds are a share of the scenes (``WorldSpec.two_kind_share``, 0.6 in the tiny profile): with several
differently coloured objects nearly every question needs two hops of attention (find the object the question
names, then read it), the skill the tiny LM learns last and least well; the one-kind scenes keep the one-hop types,
and at 0.6 more than half of the held-out questions still need binding. Share 0 is the one-kind world the course
shipped before, draw for draw. Measured in docs/binding.md.

All of it is deterministic from a seed; the held-out split uses a disjoint seed stream and is never trained on.
"""
from __future__ import annotations

import functools
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from helpers.data.chat_template import render_text_dialogue, user_message

COLOURS = {  # world 0's objects (the default world)
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 215),
    "yellow": (230, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four"}
ONE_KIND_TYPES = ("colour", "shape", "position", "count", "yes/no")
BINDING_TYPES = ("attribute", "place", "relation", "kind count", "binding yes/no")  # two-kind scenes only
QUESTION_TYPES = ONE_KIND_TYPES + BINDING_TYPES + ("follow-up",)
CAPTION_REQUEST = "Describe the image briefly."

# The pools another world draws its objects from (world 0 keeps COLOURS/SHAPES above). Colours are far apart in
# RGB (the renderer jitters each channel by +-15) and every name is a common word that Whisper hears right.
COLOUR_POOL = {
    **COLOURS,
    "orange": (250, 140, 0),
    "purple": (125, 45, 170),
    "pink": (240, 120, 190),
    "brown": (125, 75, 30),
    "black": (35, 35, 35),
}
SHAPE_POOL = ("circle", "square", "triangle", "diamond", "star", "cross")
PLURALS = {"cross": "crosses"}

# The wording: one template per slot and world. Variant 0 of every slot is world 0's wording; another world draws
# one variant per slot. Every variant keeps the answer a word (or two) of the world's vocabulary, scored exactly,
# and is a plain English sentence (notebook 04 speaks the questions with espeak-ng and Whisper transcribes them).
TEMPLATES = {
    "caption_one": ("{number} {colour} {shape} at {cells}.", "{number} {colour} {shape} in {cells}.",
                    "a picture of {number} {colour} {shape}, at {cells}."),
    "caption_many": ("{number} {colour} {shapes}, at {cells}.", "{number} {colour} {shapes}, in {cells}.",
                     "a picture of {number} {colour} {shapes}, at {cells}."),
    "colour_one": ("What colour is the {shape}?", "Which colour is the {shape}?",
                   "What is the colour of the {shape}?"),
    "colour_many": ("What colour are the {shapes}?", "Which colour are the {shapes}?",
                    "What is the colour of the {shapes}?"),
    "shape_one": ("What shape is the {colour} object?", "Which shape is the {colour} object?",
                  "What is the shape of the {colour} object?"),
    "shape_many": ("What shape are the {colour} objects?", "Which shape are the {colour} objects?",
                   "What is the shape of the {colour} objects?"),
    "where": ("Where is the {colour} {shape}?", "In which cell is the {colour} {shape}?",
              "Where can you see the {colour} {shape}?"),
    "empty": ("Which cell is empty?", "Where is the empty cell?", "Which cell has nothing in it?"),
    "count_all": ("How many objects are there?", "How many things are there?", "How many objects can you see?"),
    "count_shape": ("How many {shapes} are there?", "How many {shapes} can you see?", "How many {shapes} are shown?"),
    "yn_colour": ("Is the colour {colour}?", "Is anything {colour}?", "Do you see the colour {colour}?"),
    "yn_shape": ("Are there {shapes}?", "Are there any {shapes}?", "Do you see any {shapes}?"),
    "follow_count": ("And how many are there?", "And how many of them are there?", "And how many can you see?"),
    "follow_colour_one": ("And what colour is it?", "And which colour is it?", "And what is its colour?"),
    "follow_colour_many": ("And what colour are they?", "And which colour are they?", "And what is their colour?"),
    # two-kind scenes (drawn after the slots above, so another world's wording of those stays what it was)
    "caption_part_one": ("{number} {colour} {shape} at {cells}", "{number} {colour} {shape} in {cells}"),
    "caption_part_many": ("{number} {colour} {shapes} at {cells}", "{number} {colour} {shapes} in {cells}"),
    "caption_two": ("{first}, and {second}.", "{first}; {second}."),
    "in_cell": ("What is in the {cell} cell?", "What can you see in the {cell} cell?", "What is in the {cell}?"),
    "yn_left": ("Is the {thing} left of the {other}?", "Is the {thing} to the left of the {other}?"),
    "yn_above": ("Is the {thing} above the {other}?", "Is the {thing} higher than the {other}?"),
    "what_left": ("What is left of the {thing}?", "What is to the left of the {thing}?"),
    "what_above": ("What is above the {thing}?", "What is over the {thing}?"),
    "count_colour": ("How many {colour} objects are there?", "How many {colour} things are there?",
                     "How many {colour} objects can you see?"),
    "yn_thing": ("Is there a {colour} {shape}?", "Do you see a {colour} {shape}?", "Is there any {colour} {shape}?"),
}
NOTHING = "nothing"  # the answer about an empty cell


@dataclass(frozen=True)
class Vocabulary:
    """What one world is made of: its colours (name -> RGB), shapes and the wording of its sentences."""

    world_seed: int
    colours: tuple[tuple[str, tuple[int, int, int]], ...]
    shapes: tuple[str, ...]
    templates: tuple[tuple[str, str], ...]  # (slot, template)
    two_kind_share: float = 0.0  # how many scenes show two kinds of object (0: every scene one kind)

    @property
    def colour_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.colours)

    def rgb(self, colour: str) -> tuple[int, int, int]:
        return dict(self.colours)[colour]

    def template(self, slot: str) -> str:
        return dict(self.templates)[slot]

    def say(self, slot: str, **words) -> str:
        return self.template(slot).format(**words)


def plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


@functools.lru_cache(maxsize=None)
def vocabulary(world_seed: int = 0, two_kind_share: float = 0.0) -> Vocabulary:
    """The objects and wording of world `world_seed`. World 0 is the course's default world (COLOURS, SHAPES and
    the first template of each slot); any other seed draws 4 colours, 3 shapes and one template per slot from the
    pools, never all of them equal to world 0's. `two_kind_share`: the share of scenes with two kinds of object."""
    if not 0.0 <= two_kind_share <= 1.0:
        raise ValueError(f"two_kind_share must be between 0 and 1, not {two_kind_share!r}")
    if world_seed == 0:
        return Vocabulary(0, tuple(COLOURS.items()), SHAPES,
                          tuple((slot, variants[0]) for slot, variants in TEMPLATES.items()), two_kind_share)
    rng = random.Random(f"mmphi world {world_seed}")
    while True:
        colours = rng.sample(sorted(COLOUR_POOL), len(COLOURS))
        shapes = rng.sample(SHAPE_POOL, len(SHAPES))
        if set(colours) != set(COLOURS) and set(shapes) != set(SHAPES):
            break
    templates = tuple((slot, rng.choice(variants)) for slot, variants in TEMPLATES.items())
    return Vocabulary(world_seed, tuple((c, COLOUR_POOL[c]) for c in colours), tuple(shapes), templates,
                      two_kind_share)


def world_vocabulary(spec) -> Vocabulary:
    """The vocabulary of a ``WorldSpec``: its world seed's objects and wording, and its share of two-kind scenes."""
    return vocabulary(spec.world_seed, spec.two_kind_share)


DEFAULT_VOCABULARY = vocabulary(0)


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    cell: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def kind(self) -> tuple[str, str]:
        return self.colour, self.shape


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]

    def by_cell(self) -> list[Thing]:
        return sorted(self.things, key=lambda t: CELLS.index(t.cell))

    def kinds(self) -> list[tuple[str, str]]:
        """The (colour, shape) kinds shown, in the order of their first cell."""
        return list(dict.fromkeys(t.kind for t in self.by_cell()))

    @property
    def two_kinds(self) -> bool:
        return len(self.kinds()) > 1

    def of_kind(self, kind: tuple[str, str]) -> list[Thing]:
        return [t for t in self.by_cell() if t.kind == kind]

    def at(self, cell: str) -> Thing | None:
        return next((t for t in self.things if t.cell == cell), None)

    @property
    def colour(self) -> str:  # of a one-kind scene
        return self.things[0].colour

    @property
    def shape(self) -> str:  # of a one-kind scene
        return self.things[0].shape

    def to_dict(self) -> dict:
        return {"things": [asdict(t) for t in self.by_cell()]}

    @staticmethod
    def from_dict(data: dict) -> "Scene":
        return Scene(tuple(Thing(**t) for t in data["things"]))


def sample_scene(rng: random.Random, vocab: Vocabulary = DEFAULT_VOCABULARY) -> Scene:
    if vocab.two_kind_share and rng.random() < vocab.two_kind_share:  # no draw at all in a one-kind world
        return _two_kind_scene(rng, vocab)
    n = rng.randint(1, 3)
    colour, shape = rng.choice(list(vocab.colour_names)), rng.choice(vocab.shapes)
    return Scene(tuple(Thing(colour, shape, cell) for cell in rng.sample(CELLS, n)))


def _two_kind_scene(rng: random.Random, vocab: Vocabulary) -> Scene:
    """Two different objects (another colour, another shape, or both, equally often), one copy each; a third of
    the time a second copy of one of them. Every object in its own cell."""
    differ = rng.choice(("colour", "shape", "both"))
    c1, s1 = rng.choice(vocab.colour_names), rng.choice(vocab.shapes)
    c2 = c1 if differ == "shape" else rng.choice([c for c in vocab.colour_names if c != c1])
    s2 = s1 if differ == "colour" else rng.choice([s for s in vocab.shapes if s != s1])
    kinds = [(c1, s1), (c2, s2)]
    if rng.random() < 1 / 3:
        kinds.append(rng.choice(kinds[:2]))
    cells = rng.sample(CELLS, len(kinds))
    return Scene(tuple(Thing(c, s, cell) for (c, s), cell in zip(kinds, cells)))


# ------------------------------------------------------------------------------------------------ images
def _star(cx: float, cy: float, r: float, points: int = 5) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        radius = r if k % 2 == 0 else 0.45 * r
        angle = math.pi * k / points - math.pi / 2
        out.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return out


def _draw_shape(draw, shape: str, box: tuple[float, float, float, float], colour) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x0, y1), (x1, y1)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r), fill=colour)
    elif shape == "cross":
        w = 0.36 * r
        draw.rectangle((cx - w, y0, cx + w, y1), fill=colour)
        draw.rectangle((x0, cy - w, x1, cy + w), fill=colour)
    else:
        raise ValueError(f"cannot draw a {shape!r}")


def render(scene: Scene, size: int, rng: random.Random, vocab: Vocabulary = DEFAULT_VOCABULARY) -> Image.Image:
    """Draw the scene: light noisy background, one shape per occupied cell with jittered size and place."""
    bg = tuple(rng.randint(225, 250) for _ in range(3))
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    half = size // 2
    for thing in scene.things:
        row, col = divmod(CELLS.index(thing.cell), 2)
        extent = rng.uniform(0.74, 0.86) * half
        cx = col * half + half / 2 + rng.uniform(-1, 1) * (half - extent) / 2
        cy = row * half + half / 2 + rng.uniform(-1, 1) * (half - extent) / 2
        box = (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)
        colour = tuple(min(255, max(0, v + rng.randint(-15, 15))) for v in vocab.rgb(thing.colour))
        _draw_shape(draw, thing.shape, box, colour)
    return image


# ------------------------------------------------------------------------------------------------- text
def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: Scene, vocab: Vocabulary = DEFAULT_VOCABULARY) -> str:
    if scene.two_kinds:
        first, second = (_caption_part(scene.of_kind(kind), vocab) for kind in scene.kinds())
        return vocab.say("caption_two", first=first, second=second)
    n = len(scene.things)
    cells = _listing(["the " + t.cell for t in scene.by_cell()])
    return vocab.say("caption_one" if n == 1 else "caption_many", number=NUMBER_WORDS[n], colour=scene.colour,
                     shape=scene.shape, shapes=plural(scene.shape), cells=cells)


def _caption_part(things: list[Thing], vocab: Vocabulary) -> str:
    n, (colour, shape) = len(things), things[0].kind
    return vocab.say("caption_part_one" if n == 1 else "caption_part_many", number=NUMBER_WORDS[n], colour=colour,
                     shape=shape, shapes=plural(shape), cells=_listing(["the " + t.cell for t in things]))


def _ask_two_kinds(scene: Scene, qtype: str, rng: random.Random, vocab: Vocabulary):
    """(question, answer, subject kind) of a binding type about a two-kind scene, or None."""
    (c1, s1), (c2, s2) = kinds = scene.kinds()
    kind = rng.choice(kinds)
    other = kinds[1 - kinds.index(kind)]
    copies = len(scene.of_kind(kind))
    if qtype == "attribute":
        if s1 != s2 and (c1 == c2 or rng.random() < 0.5):  # the shape names the object: read its colour
            return vocab.say("colour_one" if copies == 1 else "colour_many", shape=kind[1],
                             shapes=plural(kind[1])), kind[0], kind
        # else the colour names the object (two kinds of one shape differ in colour): read its shape
        return vocab.say("shape_one" if copies == 1 else "shape_many", colour=kind[0]), kind[1], kind
    if qtype == "place":
        if rng.random() < 0.5 and copies == 1:
            return vocab.say("where", colour=kind[0], shape=kind[1]), scene.of_kind(kind)[0].cell, kind
        cell = rng.choice(CELLS)
        thing = scene.at(cell)
        return vocab.say("in_cell", cell=cell), thing.name if thing else NOTHING, thing.kind if thing else None
    if qtype == "relation":
        if copies != 1:
            return None
        me = scene.of_kind(kind)[0]
        row, col = divmod(CELLS.index(me.cell), 2)
        if rng.random() < 0.5:  # yes/no about the two objects (each shown once)
            if len(scene.of_kind(other)) != 1:
                return None
            you = scene.of_kind(other)[0]
            other_row, other_col = divmod(CELLS.index(you.cell), 2)
            if rng.random() < 0.5:
                return vocab.say("yn_left", thing=me.name, other=you.name), "yes" if col < other_col else "no", kind
            return vocab.say("yn_above", thing=me.name, other=you.name), "yes" if row < other_row else "no", kind
        ways = ([("what_left", CELLS[2 * row])] if col == 1 else []) + \
            ([("what_above", CELLS[col])] if row == 1 else [])
        if not ways:
            return None
        slot, cell = rng.choice(ways)
        thing = scene.at(cell)
        return vocab.say(slot, thing=me.name), thing.name if thing else NOTHING, thing.kind if thing else None
    if qtype == "kind count":
        colour = rng.choice([c1, c2])
        return vocab.say("count_colour", colour=colour), \
            NUMBER_WORDS[sum(t.colour == colour for t in scene.things)], None
    if qtype == "binding yes/no":
        if rng.random() < 0.5:
            return vocab.say("yn_thing", colour=kind[0], shape=kind[1]), "yes", kind
        if c1 != c2 and s1 != s2:  # both words shown, wrongly paired (POPE's adversarial idea)
            colour, shape = (c1, s2) if rng.random() < 0.5 else (c2, s1)
        else:  # one of the two words shown, the other not
            colour, shape = kind
            if c1 == c2:
                colour = rng.choice([c for c in vocab.colour_names if c != c1])
            else:
                shape = rng.choice([s for s in vocab.shapes if s != s1])
        return vocab.say("yn_thing", colour=colour, shape=shape), "no", None
    return None


def scene_types(scene: Scene) -> tuple[str, ...]:
    """The base question types a scene can be asked (follow-ups aside): today's types about a one-kind scene, the
    binding types about a two-kind scene."""
    return BINDING_TYPES if scene.two_kinds else ONE_KIND_TYPES


def ask(scene: Scene, qtype: str, rng: random.Random, previous: str | None = None,
        vocab: Vocabulary = DEFAULT_VOCABULARY):
    """One (question, answer) of the given type, or None when the scene cannot support it.

    `previous` is the type of the previous turn; a follow-up refers to its objects ("it"/"they")."""
    asked = _ask(scene, qtype, rng, previous, None, vocab)
    return asked and asked[:2]


def _ask(scene: Scene, qtype: str, rng: random.Random, previous: str | None, subject: tuple[str, str] | None,
         vocab: Vocabulary):
    """(question, answer, the kind the question is about or None), or None. `subject`: the previous turn's kind."""
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {qtype!r}")
    if qtype == "follow-up":
        if previous is None or previous == "follow-up":
            return None
        if scene.two_kinds:  # "And how many are there?" about the kind the previous turn was about
            return (vocab.say("follow_count"), NUMBER_WORDS[len(scene.of_kind(subject))], subject) if subject \
                else None
    elif qtype not in scene_types(scene):
        return None
    if scene.two_kinds:
        return _ask_two_kinds(scene, qtype, rng, vocab)
    n, c, s = len(scene.things), scene.colour, scene.shape
    one = n == 1
    words = dict(colour=c, shape=s, shapes=plural(s))
    kind = (c, s)
    if qtype == "colour":
        return vocab.say("colour_one" if one else "colour_many", **words), c, kind
    if qtype == "shape":
        return vocab.say("shape_one" if one else "shape_many", **words), s, kind
    if qtype == "position":
        if one:
            return vocab.say("where", **words), scene.things[0].cell, kind
        if n == 3:
            empty = next(cell for cell in CELLS if cell not in {t.cell for t in scene.things})
            return vocab.say("empty"), empty, kind
        return None
    if qtype == "count":
        if rng.random() < 0.5:
            return vocab.say("count_all"), NUMBER_WORDS[n], kind
        other = rng.choice(vocab.shapes)
        return vocab.say("count_shape", shapes=plural(other)), NUMBER_WORDS[n if other == s else 0], kind
    if qtype == "yes/no":  # one attribute compared with the picture (worded so that Whisper hears it right)
        if rng.random() < 0.5:
            asked = c if rng.random() < 0.5 else rng.choice([x for x in vocab.colour_names if x != c])
            return vocab.say("yn_colour", colour=asked), "yes" if asked == c else "no", kind
        asked = s if rng.random() < 0.5 else rng.choice([x for x in vocab.shapes if x != s])
        return vocab.say("yn_shape", shapes=plural(asked)), "yes" if asked == s else "no", kind
    # a follow-up about a one-kind scene
    if previous == "colour":
        return vocab.say("follow_count"), NUMBER_WORDS[n], kind
    return vocab.say("follow_colour_one" if one else "follow_colour_many"), c, kind


def conversation(scene: Scene, rng: random.Random, turns: int, types=QUESTION_TYPES,
                 vocab: Vocabulary = DEFAULT_VOCABULARY, weights: dict | None = None) -> list[dict]:
    """A multi-turn conversation: a list of {question, answer, type}. Follow-ups refer to the previous turn.

    `weights` (question type -> relative weight; default: all equal) sets how often each base type is drawn among
    those the scene can be asked (``scene_types``)."""
    out: list[dict] = []
    subject = None
    base_types = [t for t in scene_types(scene) if t in types]
    while len(out) < turns:
        previous = out[-1]["type"] if out and out[-1]["answer"] not in ("no", "zero") else None
        follow = previous and "follow-up" in types and rng.random() < 0.3
        if follow:
            qtype = "follow-up"
        elif weights:
            qtype = rng.choices(base_types, weights=[weights.get(t, 1.0) for t in base_types])[0]
        else:
            qtype = rng.choice(base_types)
        asked = _ask(scene, qtype, rng, previous, subject, vocab)
        if asked is None or any(q["question"] == asked[0] for q in out):
            continue
        out.append({"question": asked[0], "answer": asked[1], "type": qtype})
        subject = asked[2]
    return out


def to_llava_conversations(turns: list[dict]) -> list[dict]:
    """LLaVA-Instruct layout: alternating human/gpt messages, ``<image>`` in the first human message."""
    messages = []
    for i, turn in enumerate(turns):
        value = ("<image>\n" if i == 0 else "") + turn["question"]
        messages.append({"from": "human", "value": value})
        messages.append({"from": "gpt", "value": turn["answer"]})
    return messages


def corpus_document(scene: Scene, rng: random.Random, turns: int, eos: str,
                    vocab: Vocabulary = DEFAULT_VOCABULARY, weights: dict | None = None) -> str:
    """Clean pretraining text: a dialogue in the chat layout that first describes a scene in words, then answers
    questions about it. The LM learns the language of the world and to answer from a description; the later
    stages only have to put the description into image tokens."""
    dialogue = [{"question": CAPTION_REQUEST, "answer": caption(scene, vocab)}] + \
        conversation(scene, rng, turns, vocab=vocab, weights=weights)
    return render_text_dialogue(dialogue, eos)


def blind_chance_by_type(vocab: Vocabulary = DEFAULT_VOCABULARY, n_scenes: int = 20000, seed: int = 0) -> dict:
    """The best a *blind* answerer can score on each question type when it is asked first (no history): for every
    question the world can ask, the share of scenes behind it whose answer is its most frequent one, weighted by how
    often the question comes up. Sampled from the world's own scenes, vocabulary and wording, so it holds for any
    world seed: colour 1 in (number of colours), shape 1 in (number of shapes), position 1 in 4, yes/no 1 in 2,
    count about 1 in 2 ("How many squares are there?" is "zero" whenever the scene's shape is another one).

    Later turns are not covered: their history can carry the answer ("Is the colour red?" "yes", then "What colour
    is the square?"), so a blind model may beat this there without looking."""
    from collections import Counter, defaultdict

    rng = random.Random(f"mmphi blind chance {seed}")
    answers = defaultdict(lambda: defaultdict(Counter))  # type -> question -> answer counts
    for _ in range(n_scenes):
        scene = sample_scene(rng, vocab)
        for qtype in scene_types(scene):
            asked = ask(scene, qtype, rng, vocab=vocab)
            if asked is not None:
                answers[qtype][asked[0]][asked[1]] += 1
    return {qtype: sum(max(c.values()) for c in questions.values()) / sum(sum(c.values()) for c in questions.values())
            for qtype, questions in answers.items()}


def described_questions(n_scenes: int, seed: int, vocab: Vocabulary = DEFAULT_VOCABULARY) -> list[dict]:
    """Text-only probes of the pretrained LM: a fresh scene's caption as the first answer, then one question of
    each type. Returns [{"messages", "answer", "type"}]; `messages` end with the user's question. The seed stream
    (``spec.world_seed * 1000 + 4`` in the course) is disjoint from every split that is trained on."""
    rng = random.Random(seed)
    probes = []
    for _ in range(n_scenes):
        scene = sample_scene(rng, vocab)
        context = [user_message(CAPTION_REQUEST, with_image=False),
                   {"role": "assistant", "content": caption(scene, vocab)}]
        for qtype in scene_types(scene):
            asked = ask(scene, qtype, rng, vocab=vocab)
            if asked is not None:
                probes.append({"messages": context + [user_message(asked[0], with_image=False)],
                               "answer": asked[1], "type": qtype})
    return probes


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

    @property
    def stamp(self) -> Path:
        """Written last: the settings the world was generated with (a world made with other settings is stale)."""
        return self.root / "DONE"

    def complete(self, spec=None) -> bool:
        files = [self.corpus, self.captions("train"), self.captions("val"), self.instruct("train"),
                 self.instruct("val"), self.stamp]
        if not all(p.exists() for p in files):
            return False
        return spec is None or self.stamp.read_text() == spec_stamp(spec)

    def remove(self) -> None:
        """Delete what `build_world` writes (and nothing else under the root)."""
        import shutil

        for split in ("train", "val"):
            shutil.rmtree(self.images(split), ignore_errors=True)
            for p in (self.captions(split), self.instruct(split), self.scenes(split)):
                p.unlink(missing_ok=True)
        self.corpus.unlink(missing_ok=True)
        self.stamp.unlink(missing_ok=True)


def spec_stamp(spec) -> str:
    return json.dumps(asdict(spec), sort_keys=True) + "\n"


def write_split(files: WorldFiles, split: str, n: int, seed: int, image_size: int, turns: int,
                progress: bool, vocab: Vocabulary = DEFAULT_VOCABULARY, weights: dict | None = None) -> None:
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
        scene = sample_scene(rng, vocab)
        render(scene, image_size, rng, vocab).save(folder / file_name, quality=95)
        images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption(scene, vocab)})
        turns_ = conversation(scene, rng, turns, vocab=vocab, weights=weights)
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
    """Generate (or reuse) the synthetic world `spec.world_seed` under `root`. Returns the file locations.

    The world seed picks the world's objects and wording (``vocabulary``) and seeds three disjoint streams of
    scenes: training images (``world_seed * 1000 + 1``), held-out images (``+ 2``) and the text corpus (``+ 3``);
    notebook 01's text probe uses ``+ 4``."""
    files = WorldFiles(Path(root))
    if files.complete(spec) and not force:
        return files
    files.remove()  # a world of other settings (or a half-written one) is replaced, never mixed with the new one
    files.root.mkdir(parents=True, exist_ok=True)
    vocab = world_vocabulary(spec)
    weights = dict(spec.train_type_weights) if spec.train_type_weights else None  # training data only
    write_split(files, "train", spec.n_train_images, spec.world_seed * 1000 + 1, spec.image_size,
                spec.turns_per_conversation, progress, vocab, weights)
    write_split(files, "val", spec.n_heldout_images, spec.world_seed * 1000 + 2, spec.image_size,
                spec.turns_per_conversation, progress, vocab)  # held out: every type equally likely, always
    rng = random.Random(spec.world_seed * 1000 + 3)
    docs = [corpus_document(sample_scene(rng, vocab), rng, spec.corpus_questions, eos, vocab, weights)
            for _ in range(spec.n_corpus_scenes)]
    files.corpus.write_text("\n".join(docs) + "\n")
    files.stamp.write_text(spec_stamp(spec))
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
