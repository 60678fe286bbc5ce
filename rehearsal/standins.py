"""Stand-ins for every Hub source the full profile reads: real file formats, random weights, synthetic content.

The full profile reads Phi-2, CLIP ViT-B/32, phiyodr/coco2017 (+ the COCO images behind its URLs),
LLaVA-Instruct-150K, TinyStories, POPE, MMStar and an openai-whisper checkpoint. This module writes local copies of all
of them *in the exact formats of the real repos* (file names, JSON keys and layout, parquet schemas, README YAML,
shard names, safetensors/``.pt`` containers), but with random weights and synthetic data, so the full profile can
be rehearsed offline. Every writer names the section (§) of the course's survey of the real Hub repositories
("hub_formats", kept with the course's planning notes, not in this repository) it follows, and states the facts
it relies on (sizes, keys, file names) in its own docstring or constants.

Layout under the output folder ``root`` (other code depends on these paths)::

    local/<owner>/<name>/...          one folder per Hub repo (``MMPHI_*`` "local" settings point here)
    local/whisper/small.pt            openai-whisper checkpoint
    local/coco-images/{train,val}2017/<12-digit id>.jpg
    hub/                              a huggingface_hub cache of the same repos (point ``HF_HUB_CACHE`` here)
    scenes.json                       the synthetic scene behind every image (to check answers against)
    standins.json                     manifest, written last: size, version, files, counts, the two settings

Sizes: ``small`` (tiny widths, a few dozen images; seconds on 2 cores) and ``real`` (the real model sizes, a few
thousand images; minutes on a 16-core machine, ~7 GB). The content is deterministic for a given size.

Use it from the command line with ``scripts/make_standins.py`` or from Python with :func:`build_standins`.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from helpers.data import world
from helpers.data.downloads import image_readable
from helpers.models.asr import sha256_file

STANDINS_VERSION = 2  # 2: POPE's images overlap the train2017 stand-in, as in reality
ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------- repos and revisions
PHI2_REPO = "microsoft/phi-2"
CLIP_REPO = "openai/clip-vit-base-patch32"
COCO_REPO = "phiyodr/coco2017"
LLAVA_REPO = "liuhaotian/LLaVA-Instruct-150K"
TINYSTORIES_REPO = "roneneldan/TinyStories"
POPE_REPO = "lmms-lab/POPE"
MMSTAR_REPO = "Lin-Chen/MMStar"

PHI2_REVISION = "ef382358ec9e382308935a992d908de099b64c23"  # the real `main` of microsoft/phi-2 (hub_formats §0.1)
#: Snapshot folder (commit sha) of each repo in the stand-in hub cache; pass as ``revision=`` to pin it.
#: Phi-2's is the real pinned revision; the others are made up (fixed, so callers can pin them too).
STANDIN_REVISIONS = {
    PHI2_REPO: PHI2_REVISION,
    CLIP_REPO: "5a1c0ffee5a1c0ffee5a1c0ffee5a1c0ffee0001",
    COCO_REPO: "5a1c0ffee5a1c0ffee5a1c0ffee5a1c0ffee0002",
    LLAVA_REPO: "5a1c0ffee5a1c0ffee5a1c0ffee5a1c0ffee0003",
    TINYSTORIES_REPO: "5a1c0ffee5a1c0ffee5a1c0ffee5a1c0ffee0004",
    POPE_REPO: "5a1c0ffee5a1c0ffee5a1c0ffee5a1c0ffee0005",
    MMSTAR_REPO: "5a1c0ffee5a1c0ffee5a1c0ffee5a1c0ffee0006",
}
REPO_TYPES = {PHI2_REPO: "model", CLIP_REPO: "model", COCO_REPO: "dataset", LLAVA_REPO: "dataset",
              TINYSTORIES_REPO: "dataset", POPE_REPO: "dataset", MMSTAR_REPO: "dataset"}
SETTING_REPOS = {"MMPHI_PHI2": PHI2_REPO, "MMPHI_CLIP": CLIP_REPO, "MMPHI_COCO": COCO_REPO,
                 "MMPHI_LLAVA_INSTRUCT": LLAVA_REPO, "MMPHI_TINYSTORIES": TINYSTORIES_REPO, "MMPHI_POPE": POPE_REPO,
                 "MMPHI_MMSTAR": MMSTAR_REPO}

COCO_FILES = {"train": "data/train-00000-of-00001-0084e041f1902997.parquet",
              "validation": "data/validation-00000-of-00001-e3c37e369512a3aa.parquet"}
TINYSTORIES_TRAIN_HASHES = ("2d5a1467fff1081b", "5852b56a2bd28fd9", "a26307300439e943", "d243063613e5a057")
TINYSTORIES_VALIDATION_FILE = "data/validation-00000-of-00001-869c898b519ad725.parquet"
POPE_FILES = tuple(f"data/test-{i:05d}-of-00003.parquet" for i in range(3))
MMSTAR_FILE = "mmstar.parquet"
LLAVA_FILE = "llava_instruct_150k.json"
WHISPER_FILE = "whisper/small.pt"

# Files of the real repos the stand-ins leave out on purpose (recorded in the manifest).
OMITTED = {
    PHI2_REPO: {"files": [".gitattributes", "CODE_OF_CONDUCT.md", "LICENSE", "NOTICE.md", "SECURITY.md"],
                "why": "documentation only; README.md is a short stand-in note"},
    CLIP_REPO: {"files": ["pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "vocab.json", "merges.txt",
                          "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"],
                "why": "weights are in model.safetensors instead (hub_formats §3); the course never loads CLIP's "
                       "tokenizer"},
    COCO_REPO: {"files": [], "why": "README keeps dataset_info.features but drops splits/sizes (hub_formats §0.5)"},
    LLAVA_REPO: {"files": ["llava_instruct_80k.json", "conversation_58k.json", "complex_reasoning_77k.json",
                           "detail_23k.json", "llava_v1_5_mix665k.json"],
                 "why": "the course reads llava_instruct_150k.json only"},
    TINYSTORIES_REPO: {"files": ["TinyStories-train.txt", "TinyStories-valid.txt", "TinyStoriesV2-GPT4-train.txt",
                                 "TinyStoriesV2-GPT4-valid.txt", "TinyStories_all_data.tar.gz",
                                 "MLP_input_output.npy", "Evaluation prompts.yaml"],
                       "why": "datasets reads the parquet files only (hub_formats §6)"},
    POPE_REPO: {"files": ["Full/..."], "why": "only the default config (data/test-*) is written"},
    MMSTAR_REPO: {"files": ["MMStar.tsv"], "why": "the course reads mmstar.parquet only (hub_formats §11)"},
}

# ------------------------------------------------------------------------------------------------ sizes


@dataclass(frozen=True)
class StandinSpec:
    """What to write for one size. Counts of problem images are per split: (train, validation)."""

    size: str
    phi2: dict                     # overrides of PHI2_CONFIG (widths and depths only)
    clip_text: dict                # overrides of CLIP's text_config
    clip_vision: dict              # overrides of CLIP's vision_config
    clip_projection_dim: int
    whisper_dims: dict
    coco_images: tuple[int, int]   # (train2017, val2017)
    truncated: tuple[int, int]
    not_jpeg: tuple[int, int]
    grayscale: tuple[int, int]
    missing: tuple[int, int]
    llava_records_per_image: float
    llava_long_records: int        # records whose answer is over 1,000 Phi-2 tokens
    tinystories_train: tuple[int, int, int, int]
    tinystories_validation: int
    pope_images: int
    pope_questions_per_image: int  # per category, half "yes" and half "no"
    mmstar_questions_per_category: int  # MMStar: six categories (the real set has 250 each)
    seed: int = 2024

    def signature(self) -> dict:
        """What a rebuild is compared on (besides the version)."""
        return asdict(self)


#: openai-whisper "small" (small.pt): the dims of the real-size stand-in.
REAL_WHISPER_SMALL_DIMS = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=768, n_audio_head=12,
                               n_audio_layer=12, n_vocab=51865, n_text_ctx=448, n_text_state=768, n_text_head=12,
                               n_text_layer=12)



def spec_for(size: str, images: int | None = None) -> StandinSpec:
    """The spec of a size: ``small`` (fixed) or ``real`` (``images`` train images, default 2000; val = 1/10)."""
    if size == "small":
        if images is not None:
            raise ValueError("--images applies to --size real only")
        return StandinSpec(
            size="small",
            phi2=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4),
            clip_text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
            clip_vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
            clip_projection_dim=32,
            whisper_dims=dict(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=1,
                              n_vocab=51865, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=1),
            coco_images=(64, 16), truncated=(2, 1), not_jpeg=(1, 0), grayscale=(3, 1), missing=(2, 1),
            llava_records_per_image=150 / 64, llava_long_records=3,
            tinystories_train=(400, 8, 8, 8), tinystories_validation=50,
            pope_images=12, pope_questions_per_image=2, mmstar_questions_per_category=4,
        )
    if size == "real":
        n_train = 2000 if images is None else int(images)
        n_val = max(16, n_train // 10)
        few = lambda n, per: max(1, n // per)  # noqa: E731
        return StandinSpec(
            size="real", phi2={}, clip_text={}, clip_vision={}, clip_projection_dim=512,
            whisper_dims=dict(REAL_WHISPER_SMALL_DIMS),
            coco_images=(n_train, n_val), truncated=(few(n_train, 200), few(n_val, 100)),
            not_jpeg=(few(n_train, 400), few(n_val, 200)), grayscale=(few(n_train, 100), few(n_val, 50)),
            missing=(few(n_train, 200), few(n_val, 100)),
            llava_records_per_image=3.0, llava_long_records=max(3, n_train // 100),
            tinystories_train=(25_000, 1_000, 1_000, 1_000), tinystories_validation=2_000,
            pope_images=500, pope_questions_per_image=6, mmstar_questions_per_category=250,
        )
    raise ValueError(f"unknown size {size!r} (small or real)")


# ------------------------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class StandinLayout:
    """Where every stand-in lives under ``root``."""

    root: Path

    @property
    def local(self) -> Path:
        return self.root / "local"

    @property
    def hub(self) -> Path:
        return self.root / "hub"

    @property
    def manifest(self) -> Path:
        return self.root / "standins.json"

    @property
    def scenes(self) -> Path:
        return self.root / "scenes.json"

    def repo(self, repo_id: str) -> Path:
        return self.local / repo_id

    @property
    def whisper(self) -> Path:
        return self.local / WHISPER_FILE

    @property
    def coco_images(self) -> Path:
        return self.local / "coco-images"

    def coco_image_dir(self, split: str) -> Path:
        return self.coco_images / ("train2017" if split == "train" else "val2017")

    def hub_snapshot(self, repo_id: str) -> Path:
        return self.hub / hub_folder_name(repo_id) / "snapshots" / STANDIN_REVISIONS[repo_id]

    def generated(self) -> list[Path]:
        """Everything a build writes (and nothing else under root): what ``--force`` removes."""
        return [self.local, self.hub, self.scenes, self.manifest]


def hub_folder_name(repo_id: str) -> str:
    """``models--owner--name`` / ``datasets--owner--name``, as huggingface_hub names cache folders."""
    return f"{REPO_TYPES[repo_id]}s--" + repo_id.replace("/", "--")


# ------------------------------------------------------------------------------------------------ small file helpers


def write_json(path: Path, obj, *, indent: int | None = 2, sort_keys: bool = False, ensure_ascii: bool = True,
               newline: bool = True, compact: bool = False) -> None:
    """Write JSON the way the Hub files were written (indent, separators, key order and trailing newline are part
    of the format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii,
                      separators=(",", ":") if compact else None)
    path.write_text(text + ("\n" if newline else ""), encoding="utf-8")


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def readme_with_yaml(yaml: str, title: str, body: str) -> str:
    """A dataset/model card: YAML front matter, then a short note that this is a stand-in."""
    return (f"---\n{yaml.strip()}\n---\n\n# {title} (mmphi stand-in)\n\n{body.strip()}\n\n"
            "Generated by `mmphi` (`rehearsal/standins.py`): same files, layout and schema as the Hub repo; synthetic "
            "content (coloured shapes) and random weights, for offline rehearsals only.\n")


# ====================================================================================== Phi-2 tokenizer (§1.4, §2)
ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256
GPT2_MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
#: GPT-2's pre-tokenizer split (r50k); HF's ByteLevel(use_regex=True) implements the same.
GPT2_SPLIT_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
#: CodeGen/Phi-2's 38 added whitespace tokens, ids 50257..50294: 31..2 spaces, then 9..2 tabs.
PHI2_WHITESPACE_TOKENS = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]


def whisper_asset(name: str) -> Path:
    """A file from openai-whisper's ``assets`` folder, found without importing whisper (and torch)."""
    spec = importlib.util.find_spec("whisper")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("openai-whisper is not installed; it ships the GPT-2 ranks (whisper/assets/gpt2.tiktoken)")
    return Path(list(spec.submodule_search_locations)[0]) / "assets" / name


def load_gpt2_ranks(path: Path | None = None) -> dict[bytes, int]:
    """GPT-2's BPE ranks from whisper's ``gpt2.tiktoken`` (lines ``base64(token) rank``; = r50k_base, §2)."""
    ranks = {}
    for line in (path or whisper_asset("gpt2.tiktoken")).read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def bpe_below_rank(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair-encode `token`, applying only merges of rank < `max_rank`, lowest rank first (tiktoken's order)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank, best_at = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
                best_rank, best_at = rank, i
        if best_at is None:
            break
        parts[best_at:best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    return parts


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list behind tiktoken ranks: merging a token with the merges below its own rank must leave exactly
    two parts, and those are the merge that created it (merge i creates the token of rank 256 + i, §2)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = bpe_below_rank(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"rank {rank} ({token!r}) does not split into one merge: {parts}")
        merges.append((parts[0], parts[1]))
    return merges


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table: printable Latin-1 bytes map to themselves, the other
    68 bytes to U+0100 upwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def token_to_string(token: bytes, table: dict[int, str]) -> str:
    return "".join(table[b] for b in token)


def default_cache_dir() -> Path:
    """Where slow, size-independent results are cached once per machine: ``$MMPHI_CACHE`` or ``~/.cache/mmphi``."""
    base = os.environ.get("MMPHI_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "mmphi")
    return Path(base).expanduser()


def gpt2_merges_text(cache_dir: Path | None = None) -> str:
    """The text of GPT-2's ``merges.txt`` (= OpenAI's ``vocab.bpe``), recovered from the ranks and cached.

    The cache is trusted only when its sha256 is GPT-2's, so a damaged cache file is simply recomputed."""
    cache = (cache_dir or default_cache_dir()) / "gpt2_merges.txt"
    if cache.exists() and hashlib.sha256(cache.read_bytes()).hexdigest() == GPT2_MERGES_SHA256:
        return cache.read_text(encoding="utf-8")
    table = bytes_to_unicode()
    merges = recover_merges(load_gpt2_ranks())
    text = "#version: 0.2\n" + "".join(f"{token_to_string(a, table)} {token_to_string(b, table)}\n"
                                        for a, b in merges)
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != GPT2_MERGES_SHA256:
        raise RuntimeError("recovered merges differ from GPT-2's vocab.bpe; is whisper's gpt2.tiktoken intact?")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(cache)
    return text


def gpt2_vocab() -> dict[str, int]:
    """GPT-2's ``encoder.json``: byte-level strings -> ids 0..50255 in rank order, then ``<|endoftext|>`` 50256."""
    table = bytes_to_unicode()
    ranks = load_gpt2_ranks()
    vocab = {token_to_string(token, table): rank for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])}
    vocab[ENDOFTEXT] = ENDOFTEXT_ID
    return vocab


def phi2_added_tokens() -> list[dict]:
    """The 39 added tokens of Phi-2: ``<|endoftext|>`` (special) and the 38 whitespace runs (normalized)."""
    eot = dict(id=ENDOFTEXT_ID, content=ENDOFTEXT, single_word=False, lstrip=False, rstrip=False,
               normalized=False, special=True)
    spaces = [dict(id=ENDOFTEXT_ID + 1 + i, content=text, single_word=False, lstrip=False, rstrip=False,
                   normalized=True, special=False) for i, text in enumerate(PHI2_WHITESPACE_TOKENS)]
    return [eot, *spaces]


def phi2_tokenizer_json(vocab: dict[str, int], merges_text: str) -> dict:
    """``tokenizer.json`` of a GPT-2/CodeGen byte-level BPE (§1.4), merges as ``"A B"`` strings, indent 2.

    No ``ignore_merges`` key: tokenizers added it in 0.19 (2024), after Phi-2's tokenizer was uploaded (Dec 2023).
    That makes 2,114,924 B; hub_formats' 2,114,952 B estimate includes the key (both show as "2.11 MB")."""
    merges = merges_text.splitlines()[1:]
    byte_level = lambda **kw: {"type": "ByteLevel", **kw}  # noqa: E731
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": phi2_added_tokens(),
        "normalizer": None,
        "pre_tokenizer": byte_level(add_prefix_space=False, trim_offsets=True, use_regex=True),
        "post_processor": byte_level(add_prefix_space=True, trim_offsets=False, use_regex=True),
        "decoder": byte_level(add_prefix_space=True, trim_offsets=True, use_regex=True),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "vocab": {token: i for token, i in vocab.items() if i < ENDOFTEXT_ID + 1},
                  "merges": merges},
    }


def phi2_tokenizer_config() -> dict:
    """``tokenizer_config.json`` (§1.4): CodeGenTokenizer, no pad token, no chat template, no add_bos_token."""
    decoder = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                                "special")} for t in phi2_added_tokens()}
    return {"add_prefix_space": False, "added_tokens_decoder": decoder, "bos_token": ENDOFTEXT,
            "clean_up_tokenization_spaces": True, "eos_token": ENDOFTEXT, "model_max_length": 2048,
            "tokenizer_class": "CodeGenTokenizer", "unk_token": ENDOFTEXT}


def write_phi2_tokenizer(folder: Path, cache_dir: Path | None = None) -> list[Path]:
    """Phi-2's six tokenizer files, rebuilt offline from whisper's GPT-2 ranks (§1.4, §2)."""
    folder.mkdir(parents=True, exist_ok=True)
    merges_text = gpt2_merges_text(cache_dir)
    vocab = gpt2_vocab()
    written = [folder / n for n in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                                    "special_tokens_map.json", "added_tokens.json")]
    write_json(written[0], vocab, indent=None, ensure_ascii=False, newline=False, compact=True)  # 798,156 B
    (folder / "merges.txt").write_bytes(merges_text.encode("utf-8"))  # 456,318 B
    write_json(written[2], phi2_tokenizer_json(vocab, merges_text), ensure_ascii=False, newline=False)
    write_json(written[3], phi2_tokenizer_config(), sort_keys=True)  # 7,339 B
    write_json(written[4], {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT})
    added = {text: ENDOFTEXT_ID + 1 + i for i, text in enumerate(PHI2_WHITESPACE_TOKENS)}
    write_json(written[5], added, sort_keys=True)
    return written


def gpt2_tiktoken_encoding():
    """tiktoken's GPT-2 encoding built directly from whisper's ranks and GPT-2's split regex (a reference)."""
    import tiktoken

    return tiktoken.Encoding(name="gpt2-from-whisper", pat_str=GPT2_SPLIT_REGEX, mergeable_ranks=load_gpt2_ranks(),
                             special_tokens={ENDOFTEXT: ENDOFTEXT_ID})


# ================================================================================ Phi-2 model (§1.2, §1.3, §1.5)
#: microsoft/phi-2 config.json at ef38235, exactly (§1.2): 735 bytes with indent 2, sort_keys and a newline.
PHI2_CONFIG = {
    "_name_or_path": "microsoft/phi-2",
    "architectures": ["PhiForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 50256,
    "embd_pdrop": 0.0,
    "eos_token_id": 50256,
    "hidden_act": "gelu_new",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 10240,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "phi",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "partial_rotary_factor": 0.4,
    "qk_layernorm": False,
    "resid_pdrop": 0.1,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.37.0",
    "use_cache": True,
    "vocab_size": 51200,
}
#: generation_config.json, keys in the Hub's order (§1.3): 124 bytes with indent 2 and a newline.
PHI2_GENERATION_CONFIG = {"_from_model_config": True, "transformers_version": "4.37.0.dev0",
                          "eos_token_id": 50256, "bos_token_id": 50256}
PHI2_TOTAL_SIZE = 5_559_367_680     # bytes of the real fp16 weights (index total_size, §1.5)
PHI2_MAX_SHARD_SIZE = 5_000_000_000  # transformers 4.37's default "5GB": gives the Hub's 5 GB + 564 MB shards
STD_INIT = 0.02       # N(0, 0.02) for embeddings and linear weights (Phi's initializer_range)
STD_BIAS_PROBE = 0.1  # lm_head.bias and final_layernorm.bias are nonzero, so losing them is visible


def phi2_config(spec: StandinSpec) -> dict:
    """The real config dict with only the sizes of `spec` changed (vocab_size stays 51200)."""
    unknown = set(spec.phi2) - set(PHI2_CONFIG)
    if unknown:
        raise KeyError(f"not Phi-2 config keys: {sorted(unknown)}")
    return {**PHI2_CONFIG, **spec.phi2}


def phi2_tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a ``PhiForCausalLM`` of this config, in state-dict order (built on the meta
    device: nothing is allocated, so this works for 2.7 B parameters too)."""
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    with torch.device("meta"):
        model = PhiForCausalLM(PhiConfig(**config))
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def tensor_seed(name: str, seed: int) -> int:
    return (zlib.crc32(name.encode()) + 1_000_003 * seed) % 2**63


def phi2_init_tensor(name: str, shape: tuple[int, ...], seed: int):
    """A random fp16 tensor for one Phi-2 parameter: N(0, 0.02) weights, LayerNorm weight 1 / bias 0, other biases
    0, except `lm_head.bias` and `model.final_layernorm.bias` (small random, to exercise bias handling)."""
    import torch

    generator = torch.Generator().manual_seed(tensor_seed(name, seed))
    if name in ("lm_head.bias", "model.final_layernorm.bias"):
        return torch.empty(shape, dtype=torch.float16).normal_(0.0, STD_BIAS_PROBE, generator=generator)
    if "layernorm" in name:
        return (torch.ones if name.endswith(".weight") else torch.zeros)(shape, dtype=torch.float16)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.float16)
    return torch.empty(shape, dtype=torch.float16).normal_(0.0, STD_INIT, generator=generator)


def plan_shards(sizes: list[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """transformers' greedy sharding: walk the state dict in order, start a new shard when the next tensor would
    push the current one over `max_shard_size` (and the current one is not empty)."""
    shards, current = [[]], 0
    for name, nbytes in sizes:
        if current + nbytes > max_shard_size and shards[-1]:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += nbytes
    return shards


SAFETENSORS_DTYPES = {"float16": "F16", "float32": "F32"}


def write_safetensors_streaming(path: Path, entries: list[tuple[str, tuple[int, ...]]], make_tensor,
                                dtype: str = "float16", metadata: dict | None = None, progress=None) -> int:
    """Write a ``.safetensors`` file one tensor at a time (so no full copy of the weights is ever in memory).

    Format: 8-byte little-endian header length, JSON header (tensors sorted by name, ``__metadata__`` first,
    padded with spaces to 8 bytes), then the raw tensors back to back. `make_tensor(name, shape)` returns each
    tensor in `dtype`. Returns the number of data bytes."""
    itemsize = {"float16": 2, "float32": 4}[dtype]
    entries = sorted(entries)
    header, offset = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, shape in entries:
        nbytes = itemsize * _numel(shape)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset,
                                                                                                  offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in entries:
            tensor = make_tensor(name, shape)
            if str(tensor.dtype).removeprefix("torch.") != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, header says {dtype} {shape}")
            tensor.contiguous().numpy().tofile(f)  # little-endian raw bytes, no extra copy
            if progress is not None:
                progress.update(1)
    return offset


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_phi2_weights(folder: Path, config: dict, seed: int, progress: bool = False) -> dict:
    """fp16 weights of a random ``PhiForCausalLM`` as exactly two shards + a v4-style index (§1.1, §1.5).

    The shard limit is transformers' 5 GB scaled by (this size / the real size), so the split falls where the
    real one does in proportion; at real size it gives the Hub's 4.99 GB + 564 MB. Returns the index dict."""
    from tqdm.auto import tqdm

    shapes = phi2_tensor_shapes(config)
    sizes = [(name, 2 * _numel(shape)) for name, shape in shapes]
    total = sum(n for _, n in sizes)
    limit = PHI2_MAX_SHARD_SIZE if total == PHI2_TOTAL_SIZE else total * PHI2_MAX_SHARD_SIZE // PHI2_TOTAL_SIZE
    shards = plan_shards(sizes, limit)
    if len(shards) != 2:
        raise RuntimeError(f"expected two shards, the plan has {len(shards)}")
    shape_of = dict(shapes)
    weight_map = {}
    bar = tqdm(total=len(shapes), desc="phi-2 tensors", leave=False, disable=not progress)
    for i, names in enumerate(shards, start=1):
        shard_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_streaming(folder / shard_name, [(n, shape_of[n]) for n in names],
                                    lambda n, s: phi2_init_tensor(n, s, seed), metadata={"format": "pt"},
                                    progress=bar)
        weight_map.update({n: shard_name for n in names})
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(folder / "model.safetensors.index.json", index, sort_keys=True)
    return index


def write_phi2(folder: Path, spec: StandinSpec, cache_dir: Path | None = None, progress: bool = False) -> dict:
    """The whole microsoft/phi-2 folder: config, generation config, weights, index, tokenizer files, README."""
    config = phi2_config(spec)
    write_json(folder / "config.json", config, sort_keys=True)
    write_json(folder / "generation_config.json", PHI2_GENERATION_CONFIG)
    index = write_phi2_weights(folder, config, spec.seed, progress)
    write_phi2_tokenizer(folder, cache_dir)
    write_text(folder / "README.md", readme_with_yaml(
        "license: mit\nlicense_link: https://huggingface.co/microsoft/phi-2/resolve/main/LICENSE\nlanguage:\n- en\n"
        "pipeline_tag: text-generation\ntags:\n- nlp\n- code", "Phi-2",
        f"Random fp16 weights of a `PhiForCausalLM` (hidden {config['hidden_size']}, {config['num_hidden_layers']} "
        "layers) with Phi-2's real config keys, shard layout and tokenizer."))
    return {"parameters": index["metadata"]["total_size"] // 2, "total_size": index["metadata"]["total_size"],
            "shards": sorted(set(index["weight_map"].values()))}


# ============================================================================================ CLIP ViT-B/32 (§3)
#: openai/clip-vit-base-patch32 config.json as on the Hub (old transformers 4.16 layout, keys *not* all sorted,
#: including the vision block's ``"projection_dim" : 512`` quirk). Sizes are filled in by `clip_config_text`.
CLIP_CONFIG_TEMPLATE = """{
  "_name_or_path": "openai/clip-vit-base-patch32",
  "architectures": [
    "CLIPModel"
  ],
  "initializer_factor": 1.0,
  "logit_scale_init_value": 2.6592,
  "model_type": "clip",
  "projection_dim": $projection_dim,
  "text_config": {
$common_head    "bos_token_id": 0,
$common_mid    "eos_token_id": 2,
$common_act    "hidden_size": $text_hidden_size,
$labels    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": $text_intermediate_size,
$decoder_flags    "layer_norm_eps": 1e-05,
    "length_penalty": 1.0,
    "max_length": 20,
    "max_position_embeddings": 77,
    "min_length": 0,
    "model_type": "clip_text_model",
    "no_repeat_ngram_size": 0,
    "num_attention_heads": $text_num_attention_heads,
    "num_beam_groups": 1,
    "num_beams": 1,
    "num_hidden_layers": $text_num_hidden_layers,
$outputs    "pad_token_id": 1,
    "prefix": null,
    "projection_dim": $projection_dim,
$tail    "vocab_size": 49408
  },
  "text_config_dict": null,
  "transformers_version": null,
  "vision_config": {
$common_head    "bos_token_id": null,
$common_mid    "eos_token_id": null,
$common_act    "hidden_size": $vision_hidden_size,
$labels_vision    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": $vision_intermediate_size,
$decoder_flags    "layer_norm_eps": 1e-05,
    "length_penalty": 1.0,
    "max_length": 20,
    "min_length": 0,
    "model_type": "clip_vision_model",
    "no_repeat_ngram_size": 0,
    "num_attention_heads": $vision_num_attention_heads,
    "num_beam_groups": 1,
    "num_beams": 1,
    "num_hidden_layers": $vision_num_hidden_layers,
$outputs    "pad_token_id": null,
    "patch_size": 32,
    "prefix": null,
    "projection_dim" : $projection_dim,
$tail_vision  },
  "vision_config_dict": null
}
"""
_CLIP_BLOCKS = {
    "common_head": '    "_name_or_path": "",\n    "add_cross_attention": false,\n    "architectures": null,\n'
                   '    "attention_dropout": 0.0,\n    "bad_words_ids": null,\n',
    "common_mid": '    "chunk_size_feed_forward": 0,\n    "cross_attention_hidden_size": null,\n'
                  '    "decoder_start_token_id": null,\n    "diversity_penalty": 0.0,\n    "do_sample": false,\n'
                  '    "dropout": 0.0,\n    "early_stopping": false,\n    "encoder_no_repeat_ngram_size": 0,\n',
    "common_act": '    "finetuning_task": null,\n    "forced_bos_token_id": null,\n'
                  '    "forced_eos_token_id": null,\n    "hidden_act": "quick_gelu",\n',
    "labels": '    "id2label": {\n      "0": "LABEL_0",\n      "1": "LABEL_1"\n    },\n',
    "labels_vision": '    "id2label": {\n      "0": "LABEL_0",\n      "1": "LABEL_1"\n    },\n    "image_size": 224,\n',
    "decoder_flags": '    "is_decoder": false,\n    "is_encoder_decoder": false,\n    "label2id": {\n'
                     '      "LABEL_0": 0,\n      "LABEL_1": 1\n    },\n',
    "outputs": '    "num_return_sequences": 1,\n    "output_attentions": false,\n    "output_hidden_states": false,\n'
               '    "output_scores": false,\n',
    "tail": '    "problem_type": null,\n    "pruned_heads": {},\n    "remove_invalid_values": false,\n'
            '    "repetition_penalty": 1.0,\n    "return_dict": true,\n    "return_dict_in_generate": false,\n'
            '    "sep_token_id": null,\n    "task_specific_params": null,\n    "temperature": 1.0,\n'
            '    "tie_encoder_decoder": false,\n    "tie_word_embeddings": true,\n    "tokenizer_class": null,\n'
            '    "top_k": 50,\n    "top_p": 1.0,\n    "torch_dtype": null,\n    "torchscript": false,\n'
            '    "transformers_version": "4.16.0.dev0",\n    "use_bfloat16": false,\n',
}
_CLIP_BLOCKS["tail_vision"] = _CLIP_BLOCKS["tail"].rstrip(",\n") + "\n"
CLIP_REAL_SIZES = {"text": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
                   "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12)}
#: preprocessor_config.json (§3), exactly: 316 bytes with indent 2 and a newline.
CLIP_PREPROCESSOR_CONFIG = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                            "feature_extractor_type": "CLIPFeatureExtractor",
                            "image_mean": [0.48145466, 0.4578275, 0.40821073],
                            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}


def clip_config_text(spec: StandinSpec) -> str:
    """The Hub's CLIP config.json text with this size's widths and depths (image 224, patch 32 always)."""
    from string import Template

    values = dict(_CLIP_BLOCKS, projection_dim=spec.clip_projection_dim)
    for tower, overrides in (("text", spec.clip_text), ("vision", spec.clip_vision)):
        for key, value in {**CLIP_REAL_SIZES[tower], **overrides}.items():
            values[f"{tower}_{key}"] = value
    text = Template(CLIP_CONFIG_TEMPLATE).substitute(values)
    json.loads(text)  # still valid JSON
    return text


def write_clip(folder: Path, spec: StandinSpec) -> dict:
    """openai/clip-vit-base-patch32: verbose old-style config, exact preprocessor config, random fp32 CLIPModel
    weights in ``model.safetensors`` (§3). Tokenizer files are left out (the course never loads them)."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    text = clip_config_text(spec)
    write_text(folder / "config.json", text)
    write_json(folder / "preprocessor_config.json", CLIP_PREPROCESSOR_CONFIG)
    torch.manual_seed(spec.seed)
    model = CLIPModel(CLIPConfig.from_dict(json.loads(text))).float()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "model.safetensors").chmod(0o644)  # safetensors creates it private (0600), unlike the other files
    write_text(folder / "README.md", readme_with_yaml(
        "tags:\n- vision", "CLIP ViT-B/32",
        "Random fp32 weights of a `CLIPModel` (vision: image 224, patch 32, hidden "
        f"{model.config.vision_config.hidden_size}) with CLIP's real config layout and image preprocessing."))
    return {"parameters": sum(v.numel() for v in state.values())}


# ================================================================================================ synthetic scenes
COCO_SIZES = [(640, 480), (480, 640), (500, 375), (375, 500), (427, 640), (640, 427), (640, 425), (640, 360),
              (612, 612), (640, 512), (333, 500), (640, 640), (500, 333), (640, 426)]
SHAPE_FACTS = {"circle": "round, with no corners at all",
               "square": "four equal straight sides and four right-angled corners",
               "triangle": "three straight sides and three corners, with its tip pointing upwards"}


def render_letterboxed(scene: world.Scene, width: int, height: int, rng: random.Random):
    """The scene drawn on a square of the short side, centred on a `width` x `height` canvas of its background
    colour (so the cells keep their meaning: top left is still top left)."""
    from PIL import Image

    side = min(width, height)
    square = world.render(scene, side, rng)
    canvas = Image.new("RGB", (width, height), square.getpixel((0, 0)))
    canvas.paste(square, ((width - side) // 2, (height - side) // 2))
    return canvas


def jpeg_bytes(image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def things_phrase(scene: world.Scene, article: str = "a") -> str:
    """'a red circle' / 'two red circles'."""
    n = len(scene.things)
    if n == 1:
        return f"{article} {scene.colour} {scene.shape}"
    return f"{world.NUMBER_WORDS[n]} {scene.colour} {plural(scene.shape, n)}"


def cells_phrase(cells: list[str]) -> str:
    """'the top left and the bottom right'."""
    named = ["the " + c for c in cells]
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]


def occupied_cells(scene: world.Scene) -> list[str]:
    return [t.cell for t in scene.by_cell()]


def empty_cells(scene: world.Scene) -> list[str]:
    taken = set(occupied_cells(scene))
    return [c for c in world.CELLS if c not in taken]


def sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def coco_captions(scene: world.Scene, rng: random.Random, n: int = 5) -> list[str]:
    """`n` differently worded captions of one scene, all true (COCO has 5 per image)."""
    k, c, s = len(scene.things), scene.colour, scene.shape
    things, where = things_phrase(scene), cells_phrase(occupied_cells(scene))
    is_are = "is" if k == 1 else "are"
    options = [
        sentence(world.caption(scene)),
        f"A picture of {things} on a plain light background.",
        f"There {is_are} {things} in this image.",
        f"{sentence(things)} placed at {where}.",
        f"A simple drawing with {world.NUMBER_WORDS[k]} {c} {plural(s, k)}.",
        f"An image showing {things} at {where}.",
        (f"A single {c} {s} near {where}." if k == 1 else f"{sentence(world.NUMBER_WORDS[k])} {plural(s, k)}, "
                                                             f"all of them {c}."),
        f"A {c} shape on a pale background." if k == 1 else f"Some {c} shapes on a pale background.",
        f"{sentence(things)} and a lot of empty space.",
        f"A {c} {s} alone in a mostly empty frame." if k == 1 else f"{sentence(things)} in a mostly empty frame.",
    ]
    return rng.sample(options, n)


@dataclass
class CocoImage:
    """One row of phiyodr/coco2017 and the image behind it. `problem` marks the deliberately broken ones."""

    split: str
    image_id: int
    width: int
    height: int
    scene: world.Scene
    captions: list[str]
    caption_ids: list[int]
    license: int
    date_captured: str
    flickr_url: str
    problem: str | None = None  # None, "truncated", "not_jpeg", "grayscale" or "missing"

    @property
    def file_name(self) -> str:
        return f"{self.image_id:012d}.jpg"

    @property
    def coco_url(self) -> str:
        return f"http://images.cocodataset.org/{self.split}2017/{self.file_name}"

    def row(self) -> dict:
        """The parquet row, columns in the real order (§4)."""
        return {"license": self.license, "file_name": self.file_name, "coco_url": self.coco_url,
                "height": self.height, "width": self.width, "date_captured": self.date_captured,
                "flickr_url": self.flickr_url, "image_id": self.image_id, "ids": self.caption_ids,
                "captions": self.captions}


def fake_flickr_url(rng: random.Random) -> str:
    secret = "".join(rng.choice("0123456789abcdef") for _ in range(10))
    return (f"http://farm{rng.randint(1, 9)}.staticflickr.com/{rng.randint(1000, 9999)}/"
            f"{rng.randint(10**9, 10**10 - 1)}_{secret}_z.jpg")


def fake_date_captured(rng: random.Random) -> str:
    return (f"2013-11-{rng.randint(14, 25):02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
            f"{rng.randint(0, 59):02d}")


def plan_coco_split(split: str, image_ids: list[int], problems: dict[str, int], first_caption_id: int,
                    rng: random.Random) -> list[CocoImage]:
    """The rows of one split: a scene, a COCO-like size and five captions per image; `problems` says how many
    images to break in each way (they are spread at random over the split)."""
    kinds = [kind for kind, count in problems.items() for _ in range(count)]
    if len(kinds) > len(image_ids):
        raise ValueError("more problem images than images")
    problem_at = dict(zip(rng.sample(range(len(image_ids)), len(kinds)), kinds))
    rows, caption_id = [], first_caption_id
    for i, image_id in enumerate(image_ids):
        scene = world.sample_scene(rng)
        width, height = rng.choice(COCO_SIZES)
        captions = coco_captions(scene, rng)
        ids = [caption_id + 7 * j + rng.randint(0, 6) for j in range(len(captions))]
        caption_id = ids[-1] + 1
        rows.append(CocoImage(split, image_id, width, height, scene, captions, ids, rng.randint(1, 8),
                              fake_date_captured(rng), fake_flickr_url(rng), problem_at.get(i)))
    return rows


NOT_AN_IMAGE = (b"<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n<center><h1>404 Not Found</h1>"
                b"</center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")


def write_coco_image(item: CocoImage, folder: Path, rng: random.Random) -> None:
    """Write the JPEG of one row, broken as its `problem` says (a missing image is simply not written)."""
    if item.problem == "missing":
        return
    if item.problem == "not_jpeg":
        (folder / item.file_name).write_bytes(NOT_AN_IMAGE)
        return
    image = render_letterboxed(item.scene, item.width, item.height, rng)
    if item.problem == "grayscale":
        image = image.convert("L")
    data = jpeg_bytes(image)
    if item.problem == "truncated":
        data = data[: int(len(data) * 0.6)]
    (folder / item.file_name).write_bytes(data)


def coco_features():
    """The datasets features of phiyodr/coco2017 (§4)."""
    from datasets import Features, Value

    try:
        from datasets import List
    except ImportError:  # datasets < 4
        from datasets import Sequence as List
    return Features({"license": Value("int64"), "file_name": Value("string"), "coco_url": Value("string"),
                     "height": Value("int64"), "width": Value("int64"), "date_captured": Value("string"),
                     "flickr_url": Value("string"), "image_id": Value("int64"), "ids": List(Value("int64")),
                     "captions": List(Value("string"))})


def write_parquet(rows: list[dict], features, path: Path) -> None:
    """A parquet file as ``datasets`` writes it on ``push_to_hub`` (typed schema + ``huggingface`` metadata)."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {name: [row[name] for row in rows] for name in features}
    Dataset.from_dict(columns, features=features).to_parquet(str(path))


COCO_README_YAML = """dataset_info:
  features:
  - name: license
    dtype: int64
  - name: file_name
    dtype: string
  - name: coco_url
    dtype: string
  - name: height
    dtype: int64
  - name: width
    dtype: int64
  - name: date_captured
    dtype: string
  - name: flickr_url
    dtype: string
  - name: image_id
    dtype: int64
  - name: ids
    sequence: int64
  - name: captions
    sequence: string"""


def write_coco(layout: StandinLayout, spec: StandinSpec, rng: random.Random, progress: bool = False) -> dict:
    """phiyodr/coco2017 (two parquet files + README, §4) and the JPEGs behind its ``coco_url``s."""
    from tqdm.auto import tqdm

    n_train, n_val = spec.coco_images
    ids = rng.sample(range(1, 581_930), n_train + n_val)
    folder = layout.repo(COCO_REPO)
    result = {"images": {}, "problems": {}}
    for split, hub_split, k, image_ids, first_caption in (("train", "train", 0, ids[:n_train], 1),
                                                          ("val", "validation", 1, ids[n_train:], 700_000)):
        problems = {"truncated": spec.truncated[k], "not_jpeg": spec.not_jpeg[k], "grayscale": spec.grayscale[k],
                    "missing": spec.missing[k]}
        items = plan_coco_split(split, sorted(image_ids), problems, first_caption, rng)
        image_dir = layout.coco_image_dir(split)
        image_dir.mkdir(parents=True, exist_ok=True)
        for item in tqdm(items, desc=f"coco {split}2017", leave=False, disable=not progress):
            write_coco_image(item, image_dir, rng)
        write_parquet([item.row() for item in items], coco_features(), folder / COCO_FILES[hub_split])
        result["images"][split] = items
        result["problems"][split] = {kind: [i.file_name for i in items if i.problem == kind] for kind in problems}
    write_text(folder / "README.md", readme_with_yaml(
        COCO_README_YAML, "COCO 2017 image captions",
        "One row per image: file name, `coco_url`, size, licence, capture date, Flickr URL, image id and all its "
        "captions (`ids`, `captions`). No image bytes: fetch them from `coco_url`."))
    return result


# ====================================================================================== LLaVA-Instruct-150K (§5)
DETAIL_PROMPTS = ["Describe the image in detail.", "What can you see in this picture?",
                  "Give a thorough description of the image.", "Tell me about the contents of this image.",
                  "Explain what is shown in the picture.", "Walk me through what this image contains.",
                  "What is depicted here? Please be specific.", "Write a short paragraph describing the image."]
LONG_PROMPTS = ["Write a detailed, well-organised report about everything visible in this image.",
                "Analyse this image exhaustively: every object, every position, every colour, and what is absent.",
                "I cannot see the image. Please describe it to me as completely as you possibly can."]


def conversation_answer(scene: world.Scene, turn: dict, rng: random.Random) -> str:
    """A full-sentence answer to one of `world.ask`'s questions; its short answer word always appears in it."""
    n, c, s, short = len(scene.things), scene.colour, scene.shape, turn["answer"]
    things, one = things_phrase(scene), n == 1
    kind, question = turn["type"], turn["question"]
    if kind == "colour":
        return rng.choice([f"The {plural(s, n)} {'is' if one else 'are'} {c}.",
                           f"{'It is' if one else 'They are'} {c}.",
                           f"The {plural(s, n)} in the image {'is' if one else 'are'} {c}, "
                           f"on a light background."])
    if kind == "shape":
        return rng.choice([f"{'It is a' if one else 'They are'} {plural(s, n)}.",
                           f"The {c} {'object is a' if one else 'objects are'} {plural(s, n)}."])
    if kind == "position":
        if question.startswith("Which cell"):
            return (f"The {short} is empty; the other three places each hold a {c} {s}.")
        return rng.choice([f"The {c} {s} is at the {short} of the image.",
                           f"It is in the {short} part of the picture."])
    if kind == "count":
        if question.startswith("How many objects"):
            return f"There {'is' if one else 'are'} {short} {'object' if one else 'objects'} in the image: {things}."
        asked = question.split()[2].rstrip("s")
        if short == "zero":
            return f"There are zero {asked}s in the image; it only shows {things}."
        return f"There {'is' if one else 'are'} {short} {plural(asked, n)} in the image."
    if kind == "yes/no":
        if short == "yes":
            return rng.choice([f"Yes, the image shows {things}.", f"Yes. There {'is' if one else 'are'} {things}."])
        return rng.choice([f"No, the image shows {things} instead.", f"No. The picture only contains {things}."])
    if kind == "follow-up":
        if question.startswith("And how many"):
            return f"There {'is' if one else 'are'} {short} of them."
        return f"{'It is' if one else 'They are'} {short}."
    raise ValueError(kind)


def detail_answer(scene: world.Scene, rng: random.Random) -> str:
    """A paragraph-long description (LLaVA's "detail" kind), 60-150 words, every statement true of the scene."""
    n, c, s = len(scene.things), scene.colour, scene.shape
    parts = [rng.choice([f"The image shows {things_phrase(scene)} on a light, almost plain background.",
                         f"This is a simple picture containing {things_phrase(scene)}."])]
    for thing in scene.by_cell():
        parts.append(rng.choice([f"One {s} sits in the {thing.cell} part of the frame.",
                                 f"There is a {c} {s} at the {thing.cell}."]))
    empty = empty_cells(scene)
    parts.append(f"{sentence(cells_phrase(empty))} {'is' if len(empty) == 1 else 'are'} left empty.")
    parts.append(f"The {plural(s, n)} {'is' if n == 1 else 'are'} {SHAPE_FACTS[s]}, and the {c} colour stands "
                 "out clearly against the pale background.")
    if n > 1:
        parts.append(f"All {world.NUMBER_WORDS[n]} shapes have the same colour and the same shape; only their "
                     "positions differ.")
    parts.append(rng.choice(["Overall, it is a simple and uncluttered composition.",
                             "There is no text, no person and no other object in the picture."]))
    return " ".join(parts)


def reasoning_turn(scene: world.Scene, rng: random.Random) -> tuple[str, str]:
    """One question that needs a step of reasoning about the scene (LLaVA's "complex reasoning" kind)."""
    n, c, s = len(scene.things), scene.colour, scene.shape
    other_shape = rng.choice([x for x in world.SHAPES if x != s])
    top = sum(t.cell.startswith("top") for t in scene.things)
    bottom = n - top
    options = [
        (f"If another {c} {s} were added to an empty spot, how many {s}s would the image contain?",
         f"The image currently contains {world.NUMBER_WORDS[n]} {plural(s, n)}. Adding one more in an empty spot "
         f"would bring the total to {world.NUMBER_WORDS[n + 1]}."),
        ("Could this image help teach a child the name of a colour? Which one?",
         f"Yes. Every shape in the picture is {c}, so it is a clear example of the colour {c}, with no other "
         "colour to cause confusion."),
        (f"What would the image look like if every {s} were replaced by a {other_shape}?",
         f"It would show {world.NUMBER_WORDS[n] if n > 1 else 'a'} {c} {plural(other_shape, n)} in the same "
         f"place{'s' if n > 1 else ''}: {cells_phrase(occupied_cells(scene))}. A {other_shape} has "
         f"{SHAPE_FACTS[other_shape]}."),
        ("Which half of the image contains more shapes, the top or the bottom?",
         "Both halves contain the same number of shapes." if top == bottom else
         f"The {'top' if top > bottom else 'bottom'} half contains more: {world.NUMBER_WORDS[max(top, bottom)]} "
         f"against {world.NUMBER_WORDS[min(top, bottom)]}."),
    ]
    return rng.choice(options)


def long_answer(scene: world.Scene, rng: random.Random, min_chars: int = 5600) -> str:
    """A very long, still fully grounded report (well over 1,000 Phi-2 tokens: ~4 characters per token)."""
    n, c, s = len(scene.things), scene.colour, scene.shape
    occupied = {t.cell: t for t in scene.things}
    paragraphs = [f"Overview. {detail_answer(scene, rng)}"]
    for cell in world.CELLS:
        if cell in occupied:
            paragraphs.append(
                f"The {cell} area. This part of the image holds a {c} {s}. The {s} is {SHAPE_FACTS[s]}. It is "
                f"drawn as a solid, filled shape without any outline of a different colour, and it takes up most of "
                f"its quarter of the picture. Its colour is a slightly uneven {c}, as if it had been painted by hand.")
        else:
            paragraphs.append(
                f"The {cell} area. This part of the image is empty: it shows only the pale background. There is no "
                f"{s} here and no other shape either, so anybody counting the shapes can skip this quarter.")
    absent_colours = [x for x in world.COLOURS if x != c]
    absent_shapes = [x for x in world.SHAPES if x != s]
    paragraphs.append("Colours. " + " ".join(
        [f"The only colour used for the shapes is {c}."] +
        [f"There is nothing {x} in the image, so a question about a {x} object should be answered with no."
         for x in absent_colours]))
    paragraphs.append("Shapes. " + " ".join(
        [f"Every object is a {s}."] +
        [f"There are zero {x}s: no {x} appears anywhere in the picture." for x in absent_shapes]))
    order = " Then ".join(f"at the {cell} there {'is a ' + s if cell in occupied else 'is nothing'}."
                          for cell in world.CELLS)
    paragraphs.append(f"Counting step by step, from the top left to the bottom right: {order} That makes "
                      f"{world.NUMBER_WORDS[n]} {plural(s, n)} in total.")
    facts = [f"colour: {c}", f"shape: {s}", f"number of objects: {world.NUMBER_WORDS[n]}",
             f"occupied places: {cells_phrase(occupied_cells(scene))}",
             f"empty places: {cells_phrase(empty_cells(scene))}"]
    paragraphs.append("Key facts. " + "; ".join(facts) + ".")
    question_types = [t for t in world.QUESTION_TYPES if t != "follow-up"]
    while sum(len(p) for p in paragraphs) < min_chars:
        asked = world.ask(scene, rng.choice(question_types), rng)
        if asked is not None:
            paragraphs.append(f"If someone asked \"{asked[0]}\", the short answer would be \"{asked[1]}\". "
                              "Looking at the picture again confirms it: " + detail_answer(scene, rng))
    paragraphs.append(f"In summary, the picture is a calm, minimal arrangement of {things_phrase(scene)}, and every "
                      "statement above can be checked directly against it.")
    return "\n\n".join(paragraphs)


def with_image_token(question: str, rng: random.Random) -> str:
    """LLaVA puts ``<image>`` before or after the first question, about half the time each (§5)."""
    return "<image>\n" + question if rng.random() < 0.5 else question + "\n<image>"


def llava_conversation(scene: world.Scene, kind: str, rng: random.Random) -> list[dict]:
    """The ``conversations`` list of one record of the given kind."""
    if kind == "conversation":
        pairs = [(t["question"], conversation_answer(scene, t, rng))
                 for t in world.conversation(scene, rng, rng.randint(1, 5))]
    elif kind == "detail":
        pairs = [(rng.choice(DETAIL_PROMPTS), detail_answer(scene, rng))]
    elif kind == "reasoning":
        pairs = [reasoning_turn(scene, rng)]
        if rng.random() < 0.5:
            turn = world.conversation(scene, rng, 1)[0]
            pairs.append((turn["question"], conversation_answer(scene, turn, rng)))
    elif kind == "long":
        pairs = [(rng.choice(LONG_PROMPTS), long_answer(scene, rng))]
    else:
        raise ValueError(kind)
    messages = []
    for i, (question, answer) in enumerate(pairs):
        messages.append({"from": "human", "value": with_image_token(question, rng) if i == 0 else question})
        messages.append({"from": "gpt", "value": answer})
    return messages


def llava_records(images: list[CocoImage], spec: StandinSpec, rng: random.Random) -> list[dict]:
    """LLaVA-Instruct-150K records on the train2017 stand-in images: several per image (ids repeat, like the real
    file), kinds mixed like LLaVA's 58k conversation / 23k detail / 77k reasoning, plus a few very long ones."""
    n_records = round(len(images) * spec.llava_records_per_image)
    order = [images[i % len(images)] for i in range(n_records)]
    rng.shuffle(order)
    kinds = ["long"] * spec.llava_long_records
    kinds += rng.choices(["conversation", "detail", "reasoning"], weights=[58, 23, 77], k=n_records - len(kinds))
    rng.shuffle(kinds)
    return [{"id": f"{item.image_id:012d}", "image": item.file_name,
             "conversations": llava_conversation(item.scene, kind, rng)} for item, kind in zip(order, kinds)]


def write_llava(folder: Path, images: list[CocoImage], spec: StandinSpec, rng: random.Random) -> dict:
    """``llava_instruct_150k.json`` (a top-level list, §5) + README."""
    records = llava_records(images, spec, rng)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LLAVA_FILE).write_text(json.dumps(records), encoding="utf-8")
    write_text(folder / "README.md", readme_with_yaml(
        "license: cc-by-4.0\ntask_categories:\n- visual-question-answering\n- question-answering\nlanguage:\n- en\n"
        "pretty_name: LLaVA Visual Instruct 150K\nsize_categories:\n- 100K<n<1M",
        "LLaVA Visual Instruct 150K",
        "GPT-generated multimodal instruction-following data (conversations, detailed descriptions, complex "
        "reasoning) about COCO train2017 images."))
    turns = [len(r["conversations"]) // 2 for r in records]
    return {"records": len(records), "images": len({r["image"] for r in records}),
            "image_token_first": sum(r["conversations"][0]["value"].startswith("<image>") for r in records),
            "max_turns": max(turns), "min_turns": min(turns)}


# ============================================================================================ TinyStories (§6)
STORY_PEOPLE = [("Lily", "she"), ("Tom", "he"), ("Ben", "he"), ("Mia", "she"), ("Sam", "he"), ("Anna", "she"),
                ("Max", "he"), ("Lucy", "she"), ("Tim", "he"), ("Sue", "she"), ("Jack", "he"), ("Emma", "she"),
                ("Leo", "he"), ("Zoe", "she")]
STORY_FRIENDS = ["cat", "dog", "bird", "bunny", "frog", "duck", "bear", "fox", "mouse", "puppy"]
STORY_THINGS = ["red ball", "blue kite", "shiny rock", "little boat", "big box", "toy car", "yellow hat",
                "soft blanket", "green balloon", "wooden spoon", "funny drum", "pretty flower"]
STORY_PLACES = ["park", "garden", "beach", "forest", "yard", "pond", "farm", "hill", "kitchen", "school"]
STORY_MORALS = ["Sharing is caring.", "It is good to help your friends.", "Being kind makes everyone happy.",
                "It is okay to ask for help.", "Always say sorry when you make a mistake.",
                "Be patient and good things will come."]


def tiny_story(rng: random.Random) -> str:
    """One simple children's story from templates (a beginning, a want, a problem, help, an ending)."""
    name, he = rng.choice(STORY_PEOPLE)
    his = "his" if he == "he" else "her"
    friend, thing, place = rng.choice(STORY_FRIENDS), rng.choice(STORY_THINGS), rng.choice(STORY_PLACES)
    other, _ = rng.choice([p for p in STORY_PEOPLE if p[0] != name])
    problem, feeling = rng.choice([
        (f"A {friend} came by and wanted to play too.", rng.choice(["curious", "happy", "shy"])),
        (f"{other} saw the {thing} and said, \"Can I play with it?\"", rng.choice(["unsure", "grumpy", "kind"])),
        (f"Then the wind blew and the {thing} went up into a tree.", rng.choice(["sad", "scared", "upset"])),
    ])
    opening = rng.choice([f"Once upon a time, there was a little {'girl' if he == 'she' else 'boy'} named {name}.",
                          f"One day, {name} went to the {place}.",
                          f"{name} was a {rng.choice(['small', 'kind', 'funny', 'brave'])} child who loved to play."])
    middle = [
        rng.choice([f"{sentence(he)} had a {thing}. {sentence(he)} loved it very much.",
                    f"At the {place}, {he} found a {thing}.",
                    f"{sentence(he)} wanted to play with a {thing} all day."]),
        problem,
        f"{name} felt {feeling}.",
        rng.choice([f"\"What can I do?\" {he} asked.", f"{sentence(he)} did not know what to do.",
                    f"{sentence(he)} looked at the {friend} and smiled."]),
        rng.choice([f"{other} came to help. Together they got the {thing} back.",
                    f"{name} decided to share the {thing} with {other}.",
                    f"The {friend} jumped and jumped until the {thing} fell down."]),
    ]
    if rng.random() < 0.5:
        middle.append(rng.choice([f"They played at the {place} until the sun went down.",
                                  f"{name}'s mom called, \"Time to come home!\"",
                                  f"They laughed and ran around the {place}."]))
    ending = rng.choice([f"{name} was very happy. {rng.choice(STORY_MORALS)}",
                         f"From that day on, {name} and {his} {friend} friend were best friends.",
                         f"In the end, everyone was happy, and {name} went to bed with a big smile."])
    return " ".join([opening, *middle, ending])


def tinystories_file(shard: int) -> str:
    return f"data/train-{shard:05d}-of-00004-{TINYSTORIES_TRAIN_HASHES[shard]}.parquet"


def write_tinystories(folder: Path, spec: StandinSpec, rng: random.Random) -> dict:
    """Four train shards (real file names with their hashes) + one validation file, column ``text`` (§6)."""
    from datasets import Features, Value

    features = Features({"text": Value("string")})
    counts = {}
    for shard, n in enumerate(spec.tinystories_train):
        write_parquet([{"text": tiny_story(rng)} for _ in range(n)], features, folder / tinystories_file(shard))
        counts[tinystories_file(shard)] = n
    write_parquet([{"text": tiny_story(rng)} for _ in range(spec.tinystories_validation)], features,
                  folder / TINYSTORIES_VALIDATION_FILE)
    counts[TINYSTORIES_VALIDATION_FILE] = spec.tinystories_validation
    write_text(folder / "README.md", readme_with_yaml(
        "license: cdla-sharing-1.0\ntask_categories:\n- text-generation\nlanguage:\n- en", "TinyStories",
        "Short stories that use only words a typical 3 to 4-year-old understands. One story per row (`text`)."))
    return counts


# ================================================================================================ POPE
POPE_CATEGORIES = ("adversarial", "popular", "random")
POPE_README_YAML = """dataset_info:
  features:
  - name: id
    dtype: string
  - name: question_id
    dtype: string
  - name: question
    dtype: string
  - name: answer
    dtype: string
  - name: image_source
    dtype: string
  - name: image
    dtype: image
  - name: category
    dtype: string
configs:
- config_name: default
  data_files:
  - split: test
    path: data/test-*"""


def pope_present_objects(scene: world.Scene) -> list[str]:
    """Object names that are in the scene (POPE's "yes" questions)."""
    return [scene.shape, f"{scene.colour} {scene.shape}", f"{scene.colour} object"]


def pope_absent_objects(scene: world.Scene, category: str, popular_shapes: list[str],
                        rng: random.Random) -> list[str]:
    """Object names that are *not* in the scene, chosen as POPE's three settings choose negatives: at random,
    among the most frequent objects of the set (popular), or among objects that co-occur with the present ones
    (adversarial: same shape in another colour, or another shape in the same colour)."""
    c, s = scene.colour, scene.shape
    other_colours = [x for x in world.COLOURS if x != c]
    other_shapes = [x for x in world.SHAPES if x != s]
    if category == "random":
        names = [f"{x} {y}" for x in other_colours for y in world.SHAPES] + other_shapes
    elif category == "popular":
        names = [x for x in popular_shapes if x != s] + [f"{x} object" for x in other_colours]
    else:
        names = [f"{x} {s}" for x in other_colours] + [f"{c} {y}" for y in other_shapes]
    rng.shuffle(names)
    return names


POPE_NOT_IN_TRAIN2017_EVERY = 4  # every 4th POPE image is not a train2017 image; the others are (hub_formats §12)


def pope_rows(spec: StandinSpec, rng: random.Random,
              train_images: list[CocoImage] = ()) -> tuple[list[dict], dict]:
    """All POPE rows (category by category, like the real set) and the scene of every image.

    As in reality (POPE asks about COCO val2014 images, most of which are in train2017 too), 3 of every 4 images,
    the first ones included, are images of the train2017 stand-in (the same id and scene; readable ones from the
    first half of the split, so a run on its first images trains on them unless it removes them); the others have
    ids outside it."""
    train_ids = {item.image_id for item in train_images}
    shared = [item for item in train_images[: len(train_images) // 2] if item.problem in (None, "grayscale")]
    rng.shuffle(shared)
    images = []
    for i in range(spec.pope_images):
        if shared and i % POPE_NOT_IN_TRAIN2017_EVERY != POPE_NOT_IN_TRAIN2017_EVERY - 1:
            item = shared.pop()
            image_id, scene, (width, height) = item.image_id, item.scene, (item.width, item.height)
        else:
            image_id = rng.randint(1, 581_929)
            while image_id in train_ids:
                image_id = rng.randint(1, 581_929)
            scene, (width, height) = world.sample_scene(rng), rng.choice(COCO_SIZES)
        train_ids.add(image_id)  # no id twice
        images.append((f"COCO_val2014_{image_id:012d}", scene,
                       jpeg_bytes(render_letterboxed(scene, width, height, rng))))
    shape_counts = {s: sum(scene.shape == s for _, scene, _ in images) for s in world.SHAPES}
    popular = sorted(world.SHAPES, key=lambda s: -shape_counts[s])
    half = spec.pope_questions_per_image // 2
    rows = []
    for category in POPE_CATEGORIES:
        question_id = 0
        for source, scene, data in images:
            present = rng.sample(pope_present_objects(scene), min(half, 3))
            present += rng.choices(pope_present_objects(scene), k=half - len(present))
            absent = pope_absent_objects(scene, category, popular, rng)[:half]
            questions = [(name, "yes") for name in present] + [(name, "no") for name in absent]
            rng.shuffle(questions)
            for name, answer in questions:
                question_id += 1
                rows.append({"id": str(len(rows)), "question_id": str(question_id),
                             "question": f"Is there a {name} in the image?", "answer": answer,
                             "image_source": source, "image": {"bytes": data, "path": None},
                             "category": category})
    return rows, {source: scene.to_dict() for source, scene, _ in images}


def pope_features():
    from datasets import Features, Image, Value

    return Features({"id": Value("string"), "question_id": Value("string"), "question": Value("string"),
                     "answer": Value("string"), "image_source": Value("string"), "image": Image(),
                     "category": Value("string")})


def write_pope(folder: Path, spec: StandinSpec, rng: random.Random, train_images: list[CocoImage] = ()) -> dict:
    """lmms-lab/POPE: three parquet files ``data/test-0000{0,1,2}-of-00003.parquet`` with the images embedded
    (the datasets Image struct ``{bytes, path}``) and a README with features and ``configs`` but no ``splits``;
    most images are `train_images` too (:func:`pope_rows`)."""
    rows, scenes = pope_rows(spec, rng, train_images)
    features = pope_features()
    bounds = [round(len(rows) * i / 3) for i in range(4)]
    for i, name in enumerate(POPE_FILES):
        write_parquet(rows[bounds[i]:bounds[i + 1]], features, folder / name)
    write_text(folder / "README.md", readme_with_yaml(
        POPE_README_YAML, "POPE",
        "Polling-based Object Probing Evaluation: yes/no questions \"Is there a <object> in the image?\" about COCO "
        "val2014 images, with negatives sampled at random, among popular objects, and adversarially."))
    counts = {c: {a: sum(r["category"] == c and r["answer"] == a for r in rows) for a in ("yes", "no")}
              for c in POPE_CATEGORIES}
    in_train = {f"COCO_val2014_{item.image_id:012d}" for item in train_images} & set(scenes)
    return {"questions": len(rows), "images": len(scenes), "in_train2017": len(in_train), "per_category": counts,
            "scenes": scenes}


# ============================================================================================ MMStar (§11)
MMSTAR_CATEGORIES = {"coarse perception": "image scene and topic", "fine-grained perception": "object counting",
                     "instance reasoning": "single-instance reasoning", "logical reasoning": "common reasoning",
                     "math": "numeric commonsense and calculation",
                     "science & technology": "geography & earth science & agriculture"}
MMSTAR_README_YAML = """dataset_info:
  features:
  - name: index
    dtype: int64
  - name: question
    dtype: string
  - name: image
    dtype: image
  - name: answer
    dtype: string
  - name: category
    dtype: string
  - name: l2_category
    dtype: string
  - name: meta_info
    struct:
    - name: source
      dtype: string
    - name: split
      dtype: string
    - name: image_path
      dtype: string
configs:
- config_name: val
  data_files:
  - split: val
    path: mmstar.parquet"""
CORNERS = {"circle": 0, "square": 4, "triangle": 3}


def mmstar_item(category: str, scene: world.Scene, rng: random.Random) -> tuple[str, str, list[str]]:
    """(question, right option, three wrong options) about a scene, one kind of question per category."""
    n, colour, shape = len(scene.things), scene.colour, scene.shape
    numbers = lambda right: [str(x) for x in rng.sample([v for v in range(13) if v != right], 3)]  # noqa: E731
    if category == "coarse perception":
        wrong = [things_phrase(world.Scene(tuple(world.Thing(c, s, t.cell) for t in scene.things)))
                 for c, s in rng.sample([(c, s) for c in world.COLOURS for s in world.SHAPES
                                         if (c, s) != (colour, shape)], 3)]
        return "Which option best describes the image?", sentence(things_phrase(scene)), [sentence(w) for w in wrong]
    if category == "fine-grained perception":
        return f"How many {plural(shape, 2)} are there in the image?", str(n), numbers(n)
    if category == "instance reasoning":
        return (f"What colour is the {shape} in the {scene.things[0].cell} cell?", colour,
                rng.sample([c for c in world.COLOURS if c != colour], 3))
    if category == "logical reasoning":
        return (f"If one more {shape} were drawn in an empty cell, how many {plural(shape, 2)} would there be?",
                str(n + 1), numbers(n + 1))
    if category == "math":
        total = n * CORNERS[shape]
        return "How many corners do the shapes in the image have in total?", str(total), numbers(total)
    fact = {0: "It has no corners.", 3: "It has three corners.", 4: "It has four corners.", 5: "It has five corners."}
    return ("Which statement about the shape in the image is true?", fact[CORNERS[shape]],
            [text for k, text in fact.items() if k != CORNERS[shape]])


def mmstar_rows(spec: StandinSpec, rng: random.Random) -> list[dict]:
    """MMStar rows, category by category; every letter is the answer equally often, images PNG and JPEG in turn."""
    rows = []
    for category, l2 in MMSTAR_CATEGORIES.items():
        for _ in range(spec.mmstar_questions_per_category):
            index = len(rows)
            scene = world.sample_scene(rng)
            question, right, wrong = mmstar_item(category, scene, rng)
            letter = "ABCD"[index % 4]
            options = wrong[: "ABCD".index(letter)] + [right] + wrong["ABCD".index(letter):]
            image = render_letterboxed(scene, *rng.choice(COCO_SIZES), rng)
            if index % 2:
                data = jpeg_bytes(image)
            else:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                data = buffer.getvalue()
            text = question + "\nOptions: " + ", ".join(f"{k}: {o}" for k, o in zip("ABCD", options))
            rows.append({"index": index, "question": text, "image": {"bytes": data, "path": None}, "answer": letter,
                         "category": category, "l2_category": l2,
                         "meta_info": {"source": "mmphi stand-in", "split": "val", "image_path": f"images/{index}"}})
    return rows


def write_mmstar(folder: Path, spec: StandinSpec) -> dict:
    """Lin-Chen/MMStar: one ``mmstar.parquet`` at the repo root (the options inside the question text, the image
    embedded as the datasets Image struct) and a README. Its own random stream: other writers do not change it."""
    from datasets import Features, Image, Value

    rows = mmstar_rows(spec, random.Random(spec.seed + 11))
    features = Features({"index": Value("int64"), "question": Value("string"), "image": Image(),
                         "answer": Value("string"), "category": Value("string"), "l2_category": Value("string"),
                         "meta_info": {"source": Value("string"), "split": Value("string"),
                                       "image_path": Value("string")}})
    write_parquet(rows, features, folder / MMSTAR_FILE)
    write_text(folder / "README.md", readme_with_yaml(
        MMSTAR_README_YAML, "MMStar",
        "Multiple-choice questions that need the image: four options written inside the question, the answer a "
        "letter A-D, six core categories (`category`) of three fine-grained ones each (`l2_category`)."))
    return {"questions": len(rows), "per_category": {c: spec.mmstar_questions_per_category for c in MMSTAR_CATEGORIES},
            "answers": {k: sum(r["answer"] == k for r in rows) for k in "ABCD"}}


# ============================================================================================ Whisper (§9)
WHISPER_STOP_AFTER = 10  # decoder positions; the SOT prompt takes 3, so about 7 text tokens come out


def steer_whisper_to_stop(model, stop_after: int, seed: int) -> None:
    """Make a random Whisper end its transcripts after a few tokens, like a real one does on short clips.

    A random decoder never predicts ``<|endoftext|>``, so every ``transcribe`` decodes the maximum 224 tokens at
    each of its six fallback temperatures (157 s for one second of audio on 2 CPU cores, even at the small size).
    Here a random unit direction ``u`` is added, strongly, to the decoder's positional embeddings from position
    `stop_after` on, and ``<|endoftext|>``'s (tied) embedding row is set along ``u``: before that position its
    logit is noise, from there on it wins. Everything else stays random; the file format is untouched.

    Also initialises the decoder's positional embedding, which ``whisper.model.TextDecoder`` creates with
    ``torch.empty`` (uninitialised memory: a real checkpoint always overwrites it)."""
    import torch
    from whisper.tokenizer import get_tokenizer

    decoder = model.decoder
    width = decoder.token_embedding.weight.shape[1]
    generator = torch.Generator().manual_seed(seed)
    eot = get_tokenizer(multilingual=model.is_multilingual, num_languages=model.num_languages).eot
    with torch.no_grad():
        decoder.positional_embedding.copy_(
            torch.randn(decoder.positional_embedding.shape, generator=generator) * 0.01)
        u = torch.randn(width, generator=generator)
        u /= u.norm()
        decoder.token_embedding.weight[eot] = 13.0 * u  # early: logit ~ N(0, 13) < max of 51k random logits
        decoder.positional_embedding[stop_after:] += 4.0 * width ** 0.5 * u  # late: dominates the stream


def write_whisper(path: Path, spec: StandinSpec) -> dict:
    """An openai-whisper checkpoint: ``torch.save({"dims": ..., "model_state_dict": ...})`` of a random
    ``Whisper(ModelDimensions(...))`` in fp16, as the real ``small.pt`` (loads with ``whisper.load_model(path)``).
    Its transcripts are a few garbage tokens long (:func:`steer_whisper_to_stop`)."""
    import torch
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(spec.seed)
    dims = ModelDimensions(**spec.whisper_dims)
    model = Whisper(dims)
    steer_whisper_to_stop(model, WHISPER_STOP_AFTER, spec.seed + 1)
    state = {k: v.half() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": asdict(dims), "model_state_dict": state}, path)
    return {"parameters": sum(v.numel() for v in state.values()), "dims": asdict(dims),
            "stops_after_positions": WHISPER_STOP_AFTER}


# ============================================================================================ hub cache


def git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


LFS_SUFFIXES = (".safetensors", ".parquet", ".bin", ".pt", ".h5", ".msgpack", ".npy", ".gz")


def blob_name(path: Path) -> str:
    """The name huggingface_hub gives a file in ``blobs/``: its etag, i.e. the sha256 of an LFS file or the git
    blob sha1 of a regular one (big or binary files are LFS on the Hub)."""
    if path.suffix in LFS_SUFFIXES or path.stat().st_size > 10 * 2**20:
        return sha256_file(path)
    return git_blob_sha1(path)


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link `source` to `target` (no copy of gigabytes), copying only where links are impossible."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def add_repo_to_hub_cache(hub: Path, repo_id: str, folder: Path) -> Path:
    """Mirror `folder` into a huggingface_hub cache like a download would: ``blobs/<etag>`` (hard links to the
    local files), ``snapshots/<revision>/<path>`` (relative symlinks into blobs) and ``refs/main``."""
    revision = STANDIN_REVISIONS[repo_id]
    repo_dir = hub / hub_folder_name(repo_id)
    snapshot = repo_dir / "snapshots" / revision
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)  # no newline, like huggingface_hub writes it
    for source in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = source.relative_to(folder)
        blob = repo_dir / "blobs" / blob_name(source)
        if not blob.exists():
            link_or_copy(source, blob)
        pointer = snapshot / relative
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if pointer.is_symlink() or pointer.exists():
            pointer.unlink()
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    return snapshot


# ============================================================================================ settings + manifest


def settings_local(layout: StandinLayout) -> dict[str, str]:
    """``MMPHI_*`` -> local paths (folders of the repos, the .pt file, the coco-images folder)."""
    settings = {env: str(layout.repo(repo).resolve()) for env, repo in SETTING_REPOS.items()}
    settings["MMPHI_COCO_IMAGES"] = str(layout.coco_images.resolve())
    settings["MMPHI_WHISPER"] = str(layout.whisper.resolve())
    return dict(sorted(settings.items()))


def settings_hub(layout: StandinLayout) -> dict[str, str]:
    """``MMPHI_*`` -> Hub ids (resolved through ``HF_HUB_CACHE`` = ``hub/``); Whisper stays a path (its names
    cannot resolve offline) and the COCO images become a ``file://`` URL (so the URL download path runs)."""
    settings = dict(SETTING_REPOS)
    settings["MMPHI_COCO_IMAGES"] = layout.coco_images.resolve().as_uri()
    settings["MMPHI_WHISPER"] = str(layout.whisper.resolve())
    return dict(sorted(settings.items()))


def file_listing(folder: Path, relative_to: Path) -> dict[str, int]:
    return {str(p.relative_to(relative_to)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def read_manifest(root: Path) -> dict | None:
    path = StandinLayout(Path(root)).manifest
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_current(root: Path, spec: StandinSpec) -> bool:
    """True when ``root`` holds a finished build of this version and spec (the manifest is written last)."""
    manifest = read_manifest(root)
    return (manifest is not None and manifest.get("version") == STANDINS_VERSION and manifest.get("size") == spec.size
            and manifest.get("spec") == json.loads(json.dumps(spec.signature())))


def remove_generated(layout: StandinLayout) -> None:
    """Delete what a build writes under the root, and nothing else."""
    for path in layout.generated():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


# ============================================================================================ build


def build_standins(root: str | Path, size: str = "small", *, images: int | None = None, force: bool = False,
                   progress: bool = True, cache_dir: Path | None = None, log=print) -> dict:
    """Write all stand-ins of `size` under `root` (see the module docstring) and return the manifest.

    Idempotent: a finished build of the same version and spec is left alone (``force`` rebuilds). A partial or
    different build is removed first, so old and new files are never mixed. The hub cache's blobs are hard links
    to the ``local/`` files: copy the folder with ``cp -a`` / ``rsync -H`` to keep it from doubling in size."""
    layout = StandinLayout(Path(root))
    spec = spec_for(size, images)
    if is_current(layout.root, spec) and not force:
        log(f"stand-ins ({size}, version {STANDINS_VERSION}) already in {layout.root}: nothing to do "
            "(--force rebuilds)")
        return read_manifest(layout.root)
    remove_generated(layout)
    layout.root.mkdir(parents=True, exist_ok=True)
    results, timings = write_all(layout, spec, progress, cache_dir)
    manifest = make_manifest(layout, spec, results, timings)
    write_json(layout.manifest, manifest)  # last: its presence marks a finished build
    return manifest


def write_all(layout: StandinLayout, spec: StandinSpec, progress: bool, cache_dir: Path | None):
    """Run every writer in order (one random stream, so the content is deterministic); returns (results,
    seconds per step)."""
    from tqdm.auto import tqdm

    rng = random.Random(spec.seed)
    results, timings = {}, {}
    steps = {
        "gpt2 merges": lambda: len(gpt2_merges_text(cache_dir)),  # recovered once per machine, then cached
        "phi-2": lambda: write_phi2(layout.repo(PHI2_REPO), spec, cache_dir, progress),
        "clip": lambda: write_clip(layout.repo(CLIP_REPO), spec),
        "coco": lambda: write_coco(layout, spec, rng, progress),
        "llava": lambda: write_llava(layout.repo(LLAVA_REPO), results["coco"]["images"]["train"], spec, rng),
        "tinystories": lambda: write_tinystories(layout.repo(TINYSTORIES_REPO), spec, rng),
        "pope": lambda: write_pope(layout.repo(POPE_REPO), spec, rng, results["coco"]["images"]["train"]),
        "mmstar": lambda: write_mmstar(layout.repo(MMSTAR_REPO), spec),
        "whisper": lambda: write_whisper(layout.whisper, spec),
        "hub cache": lambda: {repo: str(add_repo_to_hub_cache(layout.hub, repo, layout.repo(repo)))
                              for repo in STANDIN_REVISIONS},
    }
    bar = tqdm(total=len(steps), desc=f"stand-ins ({spec.size})", disable=not progress)
    for name, write in steps.items():
        bar.set_postfix_str(name)
        start = time.perf_counter()
        results[name] = write()
        timings[name] = round(time.perf_counter() - start, 2)
        bar.update(1)
    bar.close()
    scenes = {"coco": {item.file_name: item.scene.to_dict() for split in ("train", "val")
                       for item in results["coco"]["images"][split]},
              "pope": results["pope"].pop("scenes")}
    write_json(layout.scenes, scenes, indent=None)
    return results, timings


def make_manifest(layout: StandinLayout, spec: StandinSpec, results: dict, timings: dict) -> dict:
    """``standins.json``: what was written (files and sizes, counts, bad images, what was left out), the revisions
    and the ``MMPHI_*`` settings in both spellings."""
    coco = results["coco"]
    counts = {
        "phi2": results["phi-2"], "clip": results["clip"],
        "coco": {split: len(coco["images"][split]) for split in ("train", "val")},
        "coco_images_written": {split: sum(1 for _ in layout.coco_image_dir(split).iterdir())
                                for split in ("train", "val")},
        "llava": results["llava"], "tinystories": results["tinystories"], "pope": results["pope"],
        "whisper": results["whisper"], "mmstar": results["mmstar"],
    }
    files = {}
    for repo in STANDIN_REVISIONS:
        files.update(file_listing(layout.repo(repo), layout.root))
    files[str(layout.whisper.relative_to(layout.root))] = layout.whisper.stat().st_size
    image_bytes = sum(p.stat().st_size for p in layout.coco_images.rglob("*.jpg"))
    return {
        "version": STANDINS_VERSION,
        "size": spec.size,
        "spec": spec.signature(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "root": str(layout.root.resolve()),
        "hf_hub_cache": str(layout.hub.resolve()),
        "revisions": dict(STANDIN_REVISIONS),
        "settings_local": settings_local(layout),
        "settings_hub": settings_hub(layout),
        "counts": counts,
        "bad_images": coco["problems"],
        "files": files,
        "coco_images": {"folder": str(layout.coco_images.relative_to(layout.root)),
                        "files": sum(counts["coco_images_written"].values()), "bytes": image_bytes},
        "total_bytes": sum(files.values()) + image_bytes,
        "scenes": str(layout.scenes.relative_to(layout.root)),
        "omitted": OMITTED,
        "timings_s": timings,
    }


def summary(manifest: dict) -> str:
    """A short human-readable account of a build."""
    c = manifest["counts"]
    lines = [
        f"stand-ins: size {manifest['size']}, version {manifest['version']}, in {manifest['root']}",
        f"  total {manifest['total_bytes'] / 2**20:.1f} MiB; seconds per step: {manifest['timings_s']}",
        f"  phi-2: {c['phi2']['parameters']:,} parameters, shards {c['phi2']['shards']}",
        f"  clip: {c['clip']['parameters']:,} parameters; whisper: {c['whisper']['parameters']:,} parameters",
        f"  coco rows {c['coco']}, images written {c['coco_images_written']}; bad images: "
        + ", ".join(f"{split} {k} {len(v)}" for split, kinds in manifest["bad_images"].items()
                    for k, v in kinds.items() if v),
        f"  llava: {c['llava']['records']} records on {c['llava']['images']} images; "
        f"tinystories: {sum(c['tinystories'].values())} stories; pope: {c['pope']['questions']} questions on "
        f"{c['pope']['images']} images ({c['pope'].get('in_train2017', 0)} of them train2017 images); "
        f"mmstar: {c['mmstar']['questions']} questions",
        "  settings (local):",
        *[f"    {k}={v}" for k, v in manifest["settings_local"].items()],
        f"  settings (hub; with HF_HUB_CACHE={manifest['hf_hub_cache']} HF_HUB_OFFLINE=1):",
        *[f"    {k}={v}" for k, v in manifest["settings_hub"].items()],
    ]
    return "\n".join(lines)


# ============================================================================================ offline checks


def check_standins(root: str | Path) -> dict:
    """Load every stand-in the way the course does, offline. Run it with ``HF_HUB_OFFLINE=1`` and
    ``HF_HUB_CACHE=<root>/hub`` set *before* Python starts (huggingface_hub reads both at import), e.g. through
    :func:`check_standins_in_subprocess`. Raises AssertionError on the first failure; returns what it saw."""
    from huggingface_hub import constants

    layout = StandinLayout(Path(root))
    assert constants.HF_HUB_OFFLINE, "set HF_HUB_OFFLINE=1 before starting Python"
    assert Path(constants.HF_HUB_CACHE).resolve() == layout.hub.resolve(), "set HF_HUB_CACHE to <root>/hub"
    seen, seconds = {}, {}
    for name, check in (("hub_downloads", _check_hub_downloads), ("phi2", _check_phi2), ("clip", _check_clip),
                        ("datasets", _check_datasets), ("whisper", _check_whisper)):
        start = time.perf_counter()
        seen[name] = check(layout)
        seconds[name] = round(time.perf_counter() - start, 2)
    seen["seconds"] = seconds
    return seen


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_hub_downloads(layout: StandinLayout) -> dict:
    """snapshot_download / hf_hub_download resolve every repo from the cache, pinned and through refs/main."""
    from huggingface_hub import hf_hub_download, snapshot_download

    for repo, revision in STANDIN_REVISIONS.items():
        kind = REPO_TYPES[repo]
        pinned = snapshot_download(repo, repo_type=kind, revision=revision)
        assert Path(pinned) == layout.hub_snapshot(repo), (repo, pinned)
        assert Path(snapshot_download(repo, repo_type=kind)) == Path(pinned)  # refs/main
        readme = hf_hub_download(repo, "README.md", repo_type=kind, revision=revision)
        assert Path(readme).read_text().startswith("---\n"), repo
    records = json.loads(Path(hf_hub_download(LLAVA_REPO, LLAVA_FILE, repo_type="dataset")).read_text())
    assert records[0]["conversations"][0]["from"] == "human"
    return {"repos": len(STANDIN_REVISIONS)}


def _check_phi2(layout: StandinLayout) -> dict:
    """Config, tokenizer and PhiForCausalLM by hub id and revision; greedy generation runs."""
    from transformers import AutoConfig, AutoTokenizer, PhiForCausalLM

    revision = STANDIN_REVISIONS[PHI2_REPO]
    config = AutoConfig.from_pretrained(PHI2_REPO, revision=revision)
    tok = AutoTokenizer.from_pretrained(PHI2_REPO, revision=revision)
    assert tok("Hello world")["input_ids"] == [15496, 995]
    model = PhiForCausalLM.from_pretrained(PHI2_REPO, revision=revision).to(_device()).eval()
    assert model.config.hidden_size == config.hidden_size and float(model.lm_head.bias.abs().sum()) > 0
    ids = tok("The red circle", return_tensors="pt")["input_ids"].to(model.device)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
    return {"tokenizer": type(tok).__name__, "hidden_size": config.hidden_size, "dtype": str(model.dtype),
            "generated": int(out.shape[1] - ids.shape[1])}


def _check_clip(layout: StandinLayout) -> dict:
    """CLIPImageProcessor + CLIPVisionModel by hub id: 224 px in, 50 positions out."""
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModel

    revision = STANDIN_REVISIONS[CLIP_REPO]
    processor = CLIPImageProcessor.from_pretrained(CLIP_REPO, revision=revision)
    tower = CLIPVisionModel.from_pretrained(CLIP_REPO, revision=revision).eval()
    picture = next(p for p in sorted(layout.coco_image_dir("val").glob("*.jpg")) if image_readable(p))
    pixels = processor(images=Image.open(picture).convert("RGB"), return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 224, 224)
    with torch.no_grad():
        hidden = tower(pixel_values=pixels).last_hidden_state
    assert tuple(hidden.shape) == (1, 50, tower.config.hidden_size)
    return {"last_hidden_state": list(hidden.shape)}


def _check_datasets(layout: StandinLayout) -> dict:
    """The local folders load with ``datasets`` (splits inferred, YAML features, no split-size check failure);
    so does a hub-cache snapshot folder (``load_dataset("<id>")`` itself cannot use a hub cache offline, §0.4)."""
    from datasets import load_dataset
    from huggingface_hub import snapshot_download

    coco = load_dataset(str(layout.repo(COCO_REPO)))
    assert set(coco) == {"train", "validation"}
    via_cache = load_dataset(snapshot_download(COCO_REPO, repo_type="dataset"), split="validation")
    assert via_cache.num_rows == coco["validation"].num_rows
    pope = load_dataset(str(layout.repo(POPE_REPO)), split="test")
    stories = load_dataset(str(layout.repo(TINYSTORIES_REPO)), split="train", streaming=True)
    assert next(iter(stories))["text"]
    llava = load_dataset("json", data_files=str(layout.repo(LLAVA_REPO) / LLAVA_FILE), split="train")
    return {"coco": {k: v.num_rows for k, v in coco.items()}, "pope": pope.num_rows, "llava": llava.num_rows}


def _check_whisper(layout: StandinLayout) -> dict:
    """``whisper.load_model(<path>)`` and ``transcribe`` of one second of silence (numpy in: no ffmpeg)."""
    import numpy as np
    import whisper

    device = _device()
    asr = whisper.load_model(str(layout.whisper), device=device)
    result = asr.transcribe(np.zeros(16000, np.float32), fp16=device == "cuda")
    assert isinstance(result["text"], str)
    return {"multilingual": asr.is_multilingual, "text_chars": len(result["text"])}


def check_standins_in_subprocess(root: str | Path, timeout: float = 900, extra_env: dict | None = None) -> dict:
    """Run :func:`check_standins` in a fresh Python with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE=<root>/hub``."""
    layout = StandinLayout(Path(root))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_CACHE=str(layout.hub.resolve()),
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1", **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    code = ("import json, sys; from rehearsal.standins import check_standins; "
            "print('STANDINS_CHECK ' + json.dumps(check_standins(sys.argv[1])))")
    done = subprocess.run([sys.executable, "-c", code, str(layout.root)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"offline check failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("STANDINS_CHECK "))
    return json.loads(line.removeprefix("STANDINS_CHECK "))
