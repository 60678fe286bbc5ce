"""One source of truth for the course's settings: the `tiny` and `full` profiles.

Both profiles run the same code. They differ only in sizes, checkpoint names and data sources:

* ``tiny``  – offline, 2 CPU cores, minutes. Small models of the *same architectures* (Phi, CLIP ViT, LLaVA
  projector) built from configs and trained on a synthetic world written in the real file formats.
* ``full``  – a GPU (Colab T4 / SageMaker): microsoft/phi-2, openai/clip-vit-base-patch32, COCO 2017 captions
  and LLaVA-Instruct-150K from the Hub.

Pick one with the ``MMPHI_PROFILE`` environment variable or the ``PROFILE`` parameter cell of a notebook;
without either, ``full`` is chosen when CUDA is available and ``tiny`` otherwise.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

PROFILE_ENV = "MMPHI_PROFILE"
OUTPUT_ENV = "MMPHI_OUTPUT_DIR"


@dataclass(frozen=True)
class WorldSpec:
    """The synthetic world (tiny profile only): which world and its size.

    `world_seed` picks the world's colours, shapes and wording (``helpers.world.vocabulary``; world 0 is the
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
    # learning-rate schedule after the warmup: "cosine" (decays over the whole run) or "warmup_stable_decay"
    # (constant, then a cosine decay over the last `decay_ratio` of the steps)
    lr_scheduler_type: str = "cosine"
    decay_ratio: float = 0.2
    adam_beta2: float = 0.999  # AdamW's second-moment decay (0.999 is the transformers default)


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
    # data sources (full): Hub ids; tiny: generated under <output>/data/world
    coco_dataset: str | None = None
    llava_instruct_repo: str | None = None
    llava_instruct_file: str | None = None
    pretrain_text_dataset: str | None = None
    n_train_samples: int | None = None  # cap on records per stage (full); None = all
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
    # than the easy ones: see README "Seeds" (the held-out split keeps every type equally likely)
    world=WorldSpec(train_type_weights=(("position", 3.0), ("yes/no", 3.0), ("count", 1.5))),
    pretrain_phi=PhiSpec(  # in tiny mode, the pretrained model *is* the course's LLM
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        partial_rotary_factor=0.4,
        max_position_embeddings=256,
        vocab_size=512,
    ),
    # 900 steps of 32 dialogues (as many as 600 x 48), the learning rate held up for the first 60 % of the steps,
    # then a cosine decay over the last 40 % (warmup-stable-decay), AdamW's beta2 at 0.95 as in LM pretraining:
    # see README "Seeds"
    pretrain=StageSpec(learning_rate=2e-3, batch_size=32, max_steps=900, logging_steps=10,
                       lr_scheduler_type="warmup_stable_decay", decay_ratio=0.4, adam_beta2=0.95),
    # one dialogue per row (50-73 tokens in world 0, up to 82 in world 1; rows are as wide as the longest one):
    # see pretrain.pack_documents
    pretrain_block_size=96,
    clip=StageSpec(learning_rate=2e-3, batch_size=128, max_steps=200, logging_steps=10, max_length=48),
    projection=StageSpec(learning_rate=2e-3, batch_size=32, epochs=1.0, logging_steps=10, max_length=128),
    instruct=StageSpec(learning_rate=2e-3, batch_size=8, epochs=4.0, logging_steps=50, max_length=160),
    projector_learning_rate=1e-3,
    lora_r=32,
    lora_alpha=64,
    lora_dropout=0.0,
    load_in_4bit=True,
    gradient_checkpointing=False,
    max_new_tokens=16,
    n_eval_samples=300,
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
    llava_instruct_repo="liuhaotian/LLaVA-Instruct-150K",
    llava_instruct_file="llava_instruct_150k.json",
    pretrain_text_dataset="roneneldan/TinyStories",
    n_train_samples=20000,
    # a ~40M-parameter Phi pretrained from scratch in notebook 01 (educational; Phi-2 is the course's LLM)
    pretrain_phi=PhiSpec(
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
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
    name = os.environ.get(PROFILE_ENV)
    if name:
        return name
    import torch

    return "full" if torch.cuda.is_available() else "tiny"


def get_profile(name: str | None = None) -> Profile:
    """The profile called `name`, or the one chosen by ``MMPHI_PROFILE`` / the hardware when `name` is None."""
    name = (name or default_profile_name()).strip().lower()
    if name not in PROFILES:
        raise ValueError(f"Unknown profile {name!r}: choose one of {sorted(PROFILES)} "
                         f"(set {PROFILE_ENV} or the PROFILE parameter of the notebook).")
    return PROFILES[name]


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
