"""One source of truth for the course's settings: the `tiny` and `full` profiles.

Both profiles run the same code. They differ only in sizes, checkpoint names and data sources:

* ``tiny``  – offline, 2 CPU cores, minutes. Small models of the *same architectures* (Phi, CLIP ViT, LLaVA
  projector) built from configs and trained on a synthetic world written in the real file formats.
* ``full``  – a GPU (Colab T4 / SageMaker): microsoft/phi-2, openai/clip-vit-base-patch32, COCO 2017 captions,
  LLaVA-Instruct-150K, TinyStories, POPE, MMStar and Whisper; every one of these *sources* is a setting that takes a
  Hub id (optionally ``@revision``) or a local path (:data:`SOURCES`, resolved by :mod:`helpers.data.sources`).

Pick one with the ``MMPHI_PROFILE`` environment variable or the ``PROFILE`` parameter cell of a notebook;
without either the profile is ``tiny``, on a GPU too: the full profile's hours start only when asked for. Any field can then be changed
without editing code: ``MMPHI_SETTINGS="instruct.max_steps=3,n_train_samples=64"`` or the ``SETTINGS`` parameter
of a notebook (``{"instruct.max_steps": 3, "phi2": "/data/phi-2"}``), and each source by its own environment
variable (``MMPHI_PHI2=/data/phi-2``). See :func:`get_profile`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

PROFILE_ENV = "MMPHI_PROFILE"
OUTPUT_ENV = "MMPHI_OUTPUT_DIR"
SETTINGS_ENV = "MMPHI_SETTINGS"


@dataclass(frozen=True)
class SourceSetting:
    """One external source of the full profile: the setting that names it and what it must contain."""

    env: str  # environment variable (also the key of the notebooks' SETTINGS dict, lower-cased without MMPHI_)
    fields: tuple[str, ...]  # the Profile fields it sets
    what: str  # what is expected there, for error messages
    repo_type: str | None  # "model" / "dataset" on the Hub; None: not a Hub repository (URL, whisper name)


SOURCES = {
    "phi2": SourceSetting("MMPHI_PHI2", ("llm_checkpoint", "tokenizer_checkpoint"),
                          "a Phi-2 checkpoint folder (config.json, *.safetensors, tokenizer files)", "model"),
    "clip": SourceSetting("MMPHI_CLIP", ("clip_checkpoint",),
                          "a CLIP checkpoint folder (config.json, preprocessor_config.json, weights)", "model"),
    "coco": SourceSetting("MMPHI_COCO", ("coco_dataset",),
                          "COCO 2017 captions as phiyodr/coco2017 parquet (data/train-*.parquet, "
                          "data/validation-*.parquet)", "dataset"),
    "coco_images": SourceSetting("MMPHI_COCO_IMAGES", ("coco_images",),
                                 "where COCO images are fetched from: a URL base (http://, https://, file://) or a "
                                 "folder with train2017/ and val2017/", None),
    "llava_instruct": SourceSetting("MMPHI_LLAVA_INSTRUCT", ("llava_instruct_repo",),
                                    "LLaVA-Instruct conversations (a folder or repo holding llava_instruct_150k.json, "
                                    "or the JSON file itself)", "dataset"),
    "tinystories": SourceSetting("MMPHI_TINYSTORIES", ("pretrain_text_dataset",),
                                 "TinyStories as parquet (data/train-*.parquet with a 'text' column)", "dataset"),
    "whisper": SourceSetting("MMPHI_WHISPER", ("whisper_checkpoint",),
                             "an openai-whisper model name (tiny, base, small, ...) or a local .pt checkpoint", None),
    "pope": SourceSetting("MMPHI_POPE", ("pope_dataset",),
                          "POPE as lmms-lab/POPE parquet (data/test-*.parquet with question, answer, category, "
                          "image)", "dataset"),
    "mmstar": SourceSetting("MMPHI_MMSTAR", ("mmstar_dataset",),
                            "MMStar as Lin-Chen/MMStar's mmstar.parquet (index, question with its options, image, "
                            "answer A-D, category), a folder or repo holding it or the file itself", "dataset"),
}
# Hub revisions the course was checked against (a user can override with "<id>@<revision>"). Only Phi-2's commit
# is known exactly (read from its Hub page when the course was written); the other repositories are read at "main"
# until a full run pins them.
PINNED_REVISIONS = {"microsoft/phi-2": "ef382358ec9e382308935a992d908de099b64c23"}


@dataclass(frozen=True)
class WorldSpec:
    """The synthetic world (tiny profile only): which world and its size.

    `world_seed` picks the world's colours, shapes and wording (``helpers.data.world.vocabulary``; world 0 is the
    course's default) and seeds its scenes; the model's own seed is ``Profile.seed``."""

    world_seed: int = 0
    image_size: int = 64
    n_train_images: int = 4000
    n_heldout_images: int = 300
    n_corpus_scenes: int = 6000
    turns_per_conversation: int = 3
    corpus_questions: int = 3  # questions per pretraining dialogue, after the description
    # how often each base question type is drawn in the *training* data (corpus and training conversations):
    # ((type, weight), ...); None = equally often. The held-out split always draws every type equally often.
    train_type_weights: tuple[tuple[str, float], ...] | None = None
    # the share of scenes with two kinds of object and the binding questions about them (helpers.data.world);
    # 0 = every scene one kind (the tiny profile sets 0.6: docs/binding.md)
    two_kind_share: float = 0.0


@dataclass(frozen=True)
class PhiSpec:
    """A Phi-architecture causal LM (transformers' PhiConfig fields)."""

    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    partial_rotary_factor: float = 0.4
    max_position_embeddings: int = 2048
    vocab_size: int = 51200


@dataclass(frozen=True)
class VisionSpec:
    """A CLIP ViT vision tower (transformers' CLIPVisionConfig fields)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    projection_dim: int = 512


@dataclass(frozen=True)
class StageSpec:
    """Optimisation settings of one training stage (fed to transformers' TrainingArguments)."""

    learning_rate: float
    batch_size: int
    max_steps: int = -1
    epochs: float = 1.0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_accum: int = 1
    logging_steps: int = 10
    max_length: int = 512
    gradient_checkpointing: bool | None = None  # None: the profile's gradient_checkpointing
    save_steps: int | None = None  # checkpoint every this many steps; None: every 25 % of the run
    # learning-rate schedule after the warmup: "cosine" (decays over the whole run) or "warmup_stable_decay"
    # (constant, then a cosine decay over the last `decay_ratio` of the steps)
    lr_scheduler_type: str = "cosine"
    decay_ratio: float = 0.2
    adam_beta2: float = 0.999  # AdamW's second-moment decay (0.999 is the transformers default)


@dataclass(frozen=True)
class Bars:
    """What a tiny run must reach. The defaults are the course's goals (the figures README "Seeds and worlds" and
    ``benchmarks/seeds.py`` measure every seed against); a profile may enforce lower floors where a world is known
    to miss a goal (the tiny profile's two-kind world: docs/binding.md). A notebook whose stage misses its bar raises
    with the measured figure (``helpers.bars.check``), so a course that stops teaching turns CI red instead of
    printing a warning. Each is a setting (``bars.text_probe=0.9``)."""

    loss_drop: float = 1.0  # 01: final held-out loss <= initial held-out loss - this (nats per token)
    text_probe: float = 0.95  # 01: exact answers to text-only questions about fresh described scenes
    heldout_accuracy: float = 0.98  # 03: exact answers to held-out questions about images, overall
    heldout_accuracy_by_type: float = 0.95  # 03: ... and for every question type
    # 03: for each binding type (helpers.data.world.BINDING_TYPES) instead, when set
    binding_accuracy_by_type: float | None = None
    eos_rate: float = 0.99  # 03: answers that end with EOS (the model stops)
    spoken_gap_points: float = 5.0  # 04: typed minus spoken accuracy, at most this many points


@dataclass(frozen=True)
class Profile:
    name: str
    # checkpoints (full) or None (tiny: built from the specs below)
    llm_checkpoint: str | None
    clip_checkpoint: str | None
    tokenizer_checkpoint: str | None
    phi: PhiSpec
    vision: VisionSpec
    world: WorldSpec | None
    # data sources (full): Hub ids or local paths (see SOURCES); tiny: generated under <output>/data/world
    coco_dataset: str | None = None
    coco_images: str | None = None
    llava_instruct_repo: str | None = None
    llava_instruct_file: str | None = None
    pretrain_text_dataset: str | None = None
    pope_dataset: str | None = None
    mmstar_dataset: str | None = None
    whisper_checkpoint: str | None = None  # None: the profile's default recogniser (helpers.models.asr)
    # how much data (full): images for stage 02, conversations for stage 03, stories for stage 01; None = all
    n_train_samples: int | None = None
    n_pope_questions: int = 0  # POPE questions asked after stage 03, spread over its three categories (0 = none)
    n_mmstar_questions: int = 0  # MMStar questions asked after stage 03 (and blind), spread over its categories
    n_freeform_questions: int = 0  # held-out free-form questions judged by helpers.scoring.evaluation.judge_freeform
    n_audio_questions: int | None = None  # held-out questions asked by voice in notebook 04 (None = all)
    # a later notebook trains a missing earlier stage on the spot only when this is true (tiny: minutes; full:
    # hours, so it must be asked for explicitly)
    train_missing_stages: bool = False
    # on a GPU: stages 02 and 03 get the micro-batch, accumulation, checkpointing and amount of data that the memory
    # and time plans say fit this many hours on the GPU found, when a notebook asks for it
    # (helpers.planning.time_plan.fit_to_gpu; reading a profile never looks at the hardware); None = as written
    gpu_hours_per_stage: float | None = None
    # the settings the user gave (environment, MMPHI_SETTINGS, SETTINGS), by key: fit_to_gpu never changes these
    pinned: frozenset = frozenset()
    # stage 01: the small Phi pretrained from scratch (in tiny mode it is *the* LLM of the course)
    pretrain_phi: PhiSpec = field(default_factory=PhiSpec)
    pretrain: StageSpec = field(default_factory=lambda: StageSpec(learning_rate=1e-3, batch_size=32))
    pretrain_block_size: int = 128
    # vision tower (tiny: trained contrastively on the synthetic captions)
    clip: StageSpec = field(default_factory=lambda: StageSpec(learning_rate=1e-3, batch_size=64))
    # stage 02: projector only
    projection: StageSpec = field(default_factory=lambda: StageSpec(learning_rate=1e-3, batch_size=32))
    # stage 03: QLoRA + projector
    instruct: StageSpec = field(default_factory=lambda: StageSpec(learning_rate=2e-4, batch_size=16))
    projector_learning_rate: float = 2e-5
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    load_in_4bit: bool = True
    gradient_checkpointing: bool = True
    vision_feature_layer: int = -2
    max_new_tokens: int = 64
    n_eval_samples: int = 300
    seed: int = 0
    # what a run must reach, or its notebook raises (tiny: see Bars); None: reported, never enforced (the full
    # profile's first runs and its rehearsal on random weights have no bar to meet)
    bars: Bars | None = None

    def checkpointing(self, stage: str) -> bool:
        """Whether `stage` ("projection", "instruct") trains with gradient checkpointing."""
        own = getattr(self, stage).gradient_checkpointing
        return self.gradient_checkpointing if own is None else own

    @property
    def image_seq_length(self) -> int:
        """Image tokens per image: patches only, the CLS token is dropped ("default" strategy)."""
        return (self.vision.image_size // self.vision.patch_size) ** 2

    def replace(self, **changes) -> "Profile":
        return dataclasses.replace(self, **changes)


TINY = Profile(
    name="tiny",
    llm_checkpoint=None,
    clip_checkpoint=None,
    tokenizer_checkpoint=None,
    phi=PhiSpec(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        partial_rotary_factor=0.4,
        max_position_embeddings=256,
        vocab_size=512,
    ),
    vision=VisionSpec(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=64,
        patch_size=32,
        projection_dim=64,
    ),
    # the hard question types (position, yes/no, count of a named shape) come up more often in the training data
    # than the easy ones: see docs/seeds.md (the held-out split keeps every type equally likely). 60 % of the scenes
    # show two kinds of object, so that more than half of the held-out questions need binding (docs/binding.md)
    world=WorldSpec(train_type_weights=(("position", 3.0), ("yes/no", 3.0), ("count", 1.5)), two_kind_share=0.6),
    pretrain_phi=PhiSpec(  # in tiny mode, the pretrained model *is* the course's LLM
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        partial_rotary_factor=0.4,
        max_position_embeddings=256,
        vocab_size=512,
    ),
    # 1200 steps of 32 dialogues (900 left world 1 seed 0's yes/no at 87 % in stage 03), the learning rate held up for
    # the first 60 % of the steps, then a cosine decay over the last 40 % (warmup-stable-decay), AdamW's beta2 at 0.95
    # as in LM pretraining: see docs/seeds.md
    pretrain=StageSpec(learning_rate=2e-3, batch_size=32, max_steps=1200, logging_steps=10,
                       lr_scheduler_type="warmup_stable_decay", decay_ratio=0.4, adam_beta2=0.95),
    # one dialogue per row (50-73 tokens in world 0, up to 82 in world 1; rows are as wide as the longest one):
    # see pretrain.pack_documents
    pretrain_block_size=96,
    clip=StageSpec(learning_rate=2e-3, batch_size=128, max_steps=200, logging_steps=10, max_length=48),
    # 3 epochs of captions (not 1): in the two-kind world one-kind position rose from 76 to 94 % (docs/binding.md)
    projection=StageSpec(learning_rate=2e-3, batch_size=32, epochs=3.0, logging_steps=10, max_length=128),
    # 10 epochs (2500 steps of 16 conversations): the binding types still rise after 6 (docs/binding.md has the
    # curve); 6 were enough for the one-kind world (docs/seeds.md). Batches of 16: a step of 16 short conversations
    # costs ~1.4x one of 8 on 2 CPU cores, and the same rate learned as well
    instruct=StageSpec(learning_rate=2e-3, batch_size=16, epochs=10.0, logging_steps=50, max_length=160),
    projector_learning_rate=1e-3,
    lora_r=32,
    lora_alpha=64,
    lora_dropout=0.0,
    load_in_4bit=True,
    gradient_checkpointing=False,
    max_new_tokens=16,
    n_eval_samples=300,
    n_audio_questions=900,
    train_missing_stages=True,
    # floors, not the goals (Bars()' defaults): the two-kind world misses the goals on every seed measured, most on
    # place and relation (docs/binding.md). Each floor sits 10-12 points under the worst of the seven runs of
    # benchmarks/results/seeds.json, so a course that stops learning still stops here
    bars=Bars(text_probe=0.65, heldout_accuracy=0.72, heldout_accuracy_by_type=0.6, binding_accuracy_by_type=0.3),
)

FULL = Profile(
    name="full",
    llm_checkpoint="microsoft/phi-2",
    clip_checkpoint="openai/clip-vit-base-patch32",
    tokenizer_checkpoint="microsoft/phi-2",
    phi=PhiSpec(),  # Phi-2: hidden 2560, 32 layers, partial rotary 0.4, vocab 51200
    vision=VisionSpec(),  # ViT-B/32 at 224 px: 49 patches + CLS
    world=None,
    coco_dataset="phiyodr/coco2017",
    coco_images="http://images.cocodataset.org",
    llava_instruct_repo="liuhaotian/LLaVA-Instruct-150K",
    llava_instruct_file="llava_instruct_150k.json",
    pretrain_text_dataset="roneneldan/TinyStories",
    pope_dataset="lmms-lab/POPE",
    mmstar_dataset="Lin-Chen/MMStar",
    whisper_checkpoint="small",
    n_train_samples=20000,
    n_pope_questions=900,
    n_mmstar_questions=300,
    n_freeform_questions=50,
    n_audio_questions=60,
    gpu_hours_per_stage=2.0,
    # a small Phi pretrained from scratch in notebook 01 (educational; Phi-2 is the course's LLM): 22M parameters in
    # its 8 layers plus 49M in the embedding and head of Phi-2's 51,200-token vocabulary. Heads of 80 dimensions as
    # in Phi-2, so partial rotary 0.4 rotates 32 (an even number: 64-dim heads would give 25 and crash)
    pretrain_phi=PhiSpec(
        hidden_size=480,
        intermediate_size=1920,
        num_hidden_layers=8,
        num_attention_heads=6,
        partial_rotary_factor=0.4,
        max_position_embeddings=512,
        vocab_size=51200,
    ),
    pretrain=StageSpec(learning_rate=6e-4, batch_size=16, max_steps=2000, logging_steps=25),
    pretrain_block_size=512,
    projection=StageSpec(learning_rate=1e-3, batch_size=16, grad_accum=16, epochs=1.0, logging_steps=10),
    instruct=StageSpec(learning_rate=2e-4, batch_size=4, grad_accum=32, epochs=1.0, logging_steps=10,
                       max_length=1024),
    projector_learning_rate=2e-5,
    lora_r=128,
    lora_alpha=256,
    lora_dropout=0.05,
    load_in_4bit=True,
    gradient_checkpointing=True,
    max_new_tokens=128,
    n_eval_samples=200,
)

PROFILES = {"tiny": TINY, "full": FULL}


def default_profile_name() -> str:
    """``$MMPHI_PROFILE``, else "tiny": a GPU never starts the full profile's hours of downloads and training unless
    it is asked for (``PROFILE = "full"`` in a notebook, ``MMPHI_PROFILE=full``, ``--profile full``)."""
    return os.environ.get(PROFILE_ENV) or "tiny"


def get_profile(name: "str | Profile | None" = None, settings: dict | None = None) -> Profile:
    """The profile called `name` (or ``MMPHI_PROFILE``, else "tiny", when `name` is None), with
    the user's settings applied, in this order (a later one wins):

    1. each source's environment variable (``MMPHI_PHI2``, ``MMPHI_COCO``, ... : :data:`SOURCES`);
    2. ``MMPHI_SETTINGS``: comma-separated ``key=value`` pairs, e.g. ``"instruct.max_steps=3,n_train_samples=64"``;
    3. `settings` (the notebooks' ``SETTINGS`` parameter): a dict with the same keys.

    Keys are Profile fields (``n_train_samples``), fields of a stage (``instruct.batch_size``, ``pretrain.max_steps``,
    ``world.world_seed``, ...) or source names (``phi2``, ``coco``, ...). Unknown keys raise, so a typo never goes unnoticed.
    """
    if isinstance(name, Profile):  # a profile made already (scripts and tests run a notebook with their own)
        return with_settings(name, settings or {}, origin="SETTINGS")
    name = (name or default_profile_name()).strip().lower()
    if name not in PROFILES:
        raise ValueError(f"Unknown profile {name!r}: choose one of {sorted(PROFILES)} "
                         f"(set {PROFILE_ENV} or the PROFILE parameter of the notebook).")
    profile = PROFILES[name]
    from_env = {key: os.environ[src.env] for key, src in SOURCES.items() if os.environ.get(src.env)}
    profile = with_settings(profile, from_env, origin="environment")
    profile = with_settings(profile, parse_settings(os.environ.get(SETTINGS_ENV, "")), origin=SETTINGS_ENV)
    return with_settings(profile, settings or {}, origin="SETTINGS")


def parse_settings(text: str) -> dict[str, str]:
    """``"a=1, b.c=x"`` -> ``{"a": "1", "b.c": "x"}`` (values are converted by :func:`with_settings`)."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{SETTINGS_ENV}: {item!r} is not of the form key=value")
        out[key.strip()] = value.strip()
    return out


def _converted(value, like, key: str):
    """`value` (often a string from the environment) in the type of the current value `like`."""
    if not isinstance(value, str) or isinstance(like, str):
        return value
    text = value.strip()
    if text.lower() in ("none", "null", ""):
        return None
    if isinstance(like, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"setting {key}: {value!r} is not true/false")
    for kind in (int, float):
        if isinstance(like, kind) or like is None:
            try:
                return kind(text)
            except ValueError:
                if like is not None:
                    raise ValueError(f"setting {key}: {value!r} is not a {kind.__name__}") from None
    return text


def with_settings(profile: Profile, settings: dict, origin: str = "settings") -> Profile:
    """`profile` with `settings` applied (see :func:`get_profile` for the keys)."""
    for key, value in settings.items():
        if key in SOURCES or key.upper() in {s.env for s in SOURCES.values()}:
            source = SOURCES.get(key) or next(s for s in SOURCES.values() if s.env == key.upper())
            profile = profile.replace(**{f: (str(value) if value is not None else None) for f in source.fields})
            continue
        head, _, rest = key.partition(".")
        if not hasattr(profile, head) or (rest and not dataclasses.is_dataclass(getattr(profile, head))):
            known = sorted({f.name for f in dataclasses.fields(profile)} | set(SOURCES))
            raise ValueError(f"{origin}: unknown setting {key!r}. Known: {', '.join(known)} "
                             "(stage fields as e.g. instruct.batch_size)")
        if not rest:
            profile = profile.replace(**{head: _converted(value, getattr(profile, head), key)})
            continue
        spec = getattr(profile, head)
        if not hasattr(spec, rest):
            raise ValueError(f"{origin}: {head} has no setting {rest!r} "
                             f"(it has {', '.join(f.name for f in dataclasses.fields(spec))})")
        spec = dataclasses.replace(spec, **{rest: _converted(value, getattr(spec, rest), key)})
        profile = profile.replace(**{head: spec})
    return profile.replace(pinned=profile.pinned | set(settings))


def output_dir(profile: Profile, root: str | os.PathLike | None = None) -> Path:
    """Where a profile's artefacts go: ``$MMPHI_OUTPUT_DIR`` or ``./outputs``, then ``/<profile>``."""
    base = Path(root or os.environ.get(OUTPUT_ENV) or "outputs")
    path = base / profile.name
    path.mkdir(parents=True, exist_ok=True)
    return path


class Paths:
    """Every artefact's location for one profile, so notebooks never spell out paths."""

    def __init__(self, profile: Profile, root: str | os.PathLike | None = None):
        self.root = output_dir(profile, root)
        self.world = self.root / "data" / "world"
        self.tokenizer = self.root / "tokenizer"
        self.base_lm = self.root / "01_pretrain" / "model"
        self.clip = self.root / "vision_tower"
        self.features = self.root / "features"
        self.projection = self.root / "02_projection" / "model"
        self.instruct = self.root / "03_qlora_instruct"
        self.assistant = self.instruct / "merged"
        self.figures = self.root / "figures"
        self.metrics = self.root / "metrics"

    def stage_dir(self, stage: str) -> Path:
        path = self.root / stage
        path.mkdir(parents=True, exist_ok=True)
        return path
