"""Stand-ins of the full profile's Hub sources (rehearsal/standins.py): exact formats, and that they load offline.

The small stand-ins are built once per session in a temporary folder (a few seconds); the whole file takes well
under a minute on 2 cores.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import urllib.request
from pathlib import Path

import pytest

from rehearsal import standins as S

PARAGRAPH = ("The quick brown fox jumps over the lazy dog. It's a sunny day in 2024, and we'll see what happens "
             "next: prices rose by 3.5% (from $1,200 to $1,242). She said, \"Don't worry!\" Naïve café owners "
             "serve crème brûlée; émojis like 🎉 and “curly quotes” also appear. Tabs\tand\nnew lines"
             "\n\ntoo.")
# Python without runs of 2+ spaces or tabs (those become Phi-2's added tokens, which tiktoken's GPT-2 lacks)
FLAT_CODE = ("import os\n\ndef add(a, b=2):\n\treturn a + b * 10\n\nclass Point:\n\tx: int = 0\n\n"
             "values = [add(i) for i in range(3) if i % 2 == 0]\nprint(f\"{values!r} -> {os.sep}\") # done\n")
INDENTED_CODE = ("def f(x):\n    if x:\n        return [y ** 2 for y in x]\n\t\treturn None\n"
                 "                                   # 35 spaces\n")


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def phi2_tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi2_tokenizer")
    S.write_phi2_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tok(phi2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(phi2_tokenizer_dir))


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """The small stand-ins: (layout, manifest)."""
    root = tmp_path_factory.mktemp("standins") / "small"
    manifest = S.build_standins(root, "small", progress=False, log=lambda *a: None)
    return S.StandinLayout(root), manifest


def read_parquet(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


# ------------------------------------------------------------------------------------------------ tokenizer
def test_gpt2_merges_recovered_byte_for_byte(phi2_tokenizer_dir):
    data = (phi2_tokenizer_dir / "merges.txt").read_bytes()
    assert hashlib.sha256(data).hexdigest() == S.GPT2_MERGES_SHA256
    assert data.startswith(b"#version: 0.2\n\xc4\xa0 t\n\xc4\xa0 a\nh e\n")
    assert len(data.splitlines()) == 50_001


def test_phi2_tokenizer_known_ids(tok):
    assert type(tok).__name__ == "CodeGenTokenizer"
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok("def f(x):\n    return x")["input_ids"] == [4299, 277, 7, 87, 2599, 198, 50284, 7783, 2124]


@pytest.mark.parametrize("text", [PARAGRAPH, FLAT_CODE], ids=["english", "python"])
def test_phi2_tokenizer_equals_tiktoken_gpt2(tok, text):
    assert "  " not in text and "\t\t" not in text
    assert tok(text)["input_ids"] == S.gpt2_tiktoken_encoding().encode(text)


def test_phi2_special_and_added_tokens(tok):
    assert len(tok) == 50_295 and tok.vocab_size == 50_257
    assert tok.bos_token_id == tok.eos_token_id == tok.unk_token_id == 50_256 and tok.pad_token is None
    assert tok("a")["input_ids"] == [64]  # no BOS prepended
    expected = {" " * n: 50_257 + 31 - n for n in range(31, 1, -1)} | {"\t" * n: 50_287 + 9 - n
                                                                        for n in range(9, 1, -1)}
    assert {text: tok.convert_tokens_to_ids(text) for text in expected} == expected
    assert sorted(expected.values()) == list(range(50_257, 50_295))


@pytest.mark.parametrize("text", [PARAGRAPH, FLAT_CODE, INDENTED_CODE], ids=["english", "flat", "indented"])
def test_phi2_tokenizer_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    if text is INDENTED_CODE:
        assert {50_284, 50_280, 50_294} <= set(ids)  # 4 spaces, 8 spaces, 2 tabs


def test_phi2_tokenizer_files_have_hub_sizes(phi2_tokenizer_dir):
    sizes = {p.name: p.stat().st_size for p in phi2_tokenizer_dir.iterdir()}
    assert sizes["vocab.json"] == 798_156 and sizes["merges.txt"] == 456_318
    assert sizes["special_tokens_map.json"] == 99 and sizes["added_tokens.json"] == 1_080
    assert sizes["tokenizer_config.json"] == 7_339
    assert round(sizes["tokenizer.json"] / 1e6, 2) == 2.11
    config = json.loads((phi2_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "CodeGenTokenizer" and len(config["added_tokens_decoder"]) == 39
    assert not {"pad_token", "chat_template", "add_bos_token"} & set(config)


def test_real_config_files_have_hub_sizes():
    assert len(json.dumps(S.PHI2_CONFIG, indent=2, sort_keys=True)) + 1 == 735
    assert len(json.dumps(S.PHI2_GENERATION_CONFIG, indent=2)) + 1 == 124
    assert len(json.dumps(S.CLIP_PREPROCESSOR_CONFIG, indent=2)) + 1 == 316


def test_real_phi2_shard_plan_matches_the_hub():
    """At real size the greedy 5 GB plan gives the Hub's shards: 4.99 GB + 564 MB, 453 tensors."""
    shapes = S.phi2_tensor_shapes(S.PHI2_CONFIG)
    sizes = [(name, 2 * S._numel(shape)) for name, shape in shapes]
    assert len(shapes) == 453 and sum(n for _, n in sizes) == S.PHI2_TOTAL_SIZE
    first, second = S.plan_shards(sizes, S.PHI2_MAX_SHARD_SIZE)
    assert round(sum(dict(sizes)[n] for n in second) / 1e6) == 564
    assert first[0] == "model.embed_tokens.weight" and second[-1] == "lm_head.bias"


# ------------------------------------------------------------------------------------------------ build
def test_manifest_and_settings(built):
    layout, manifest = built
    assert manifest["size"] == "small" and manifest["version"] == S.STANDINS_VERSION
    env = {"MMPHI_PHI2", "MMPHI_CLIP", "MMPHI_COCO", "MMPHI_COCO_IMAGES", "MMPHI_LLAVA_INSTRUCT",
           "MMPHI_TINYSTORIES", "MMPHI_WHISPER", "MMPHI_POPE", "MMPHI_MMSTAR"}
    assert set(manifest["settings_local"]) == set(manifest["settings_hub"]) == env
    assert all(Path(p).exists() for p in manifest["settings_local"].values())
    hub = manifest["settings_hub"]
    assert hub["MMPHI_PHI2"] == "microsoft/phi-2" and hub["MMPHI_POPE"] == "lmms-lab/POPE"
    assert hub["MMPHI_COCO_IMAGES"].startswith("file://") and hub["MMPHI_WHISPER"].endswith("small.pt")
    name = next(layout.coco_image_dir("val").iterdir()).name
    with urllib.request.urlopen(f"{hub['MMPHI_COCO_IMAGES']}/val2017/{name}") as response:  # the URL download path
        assert response.read() == (layout.coco_image_dir("val") / name).read_bytes()
    assert manifest["revisions"] == S.STANDIN_REVISIONS and manifest["hf_hub_cache"] == str(layout.hub.resolve())
    assert S.STANDIN_REVISIONS["microsoft/phi-2"] == "ef382358ec9e382308935a992d908de099b64c23"
    assert all(len(sha) == 40 and int(sha, 16) >= 0 for sha in S.STANDIN_REVISIONS.values())


def test_build_is_idempotent(built):
    layout, _ = built
    stamp = layout.manifest.stat().st_mtime_ns
    said = []
    S.build_standins(layout.root, "small", progress=False, log=said.append)
    assert layout.manifest.stat().st_mtime_ns == stamp and "nothing to do" in said[0]


def test_phi2_config_index_and_shards(built):
    from safetensors import safe_open

    layout, _ = built
    folder = layout.repo(S.PHI2_REPO)
    config = json.loads((folder / "config.json").read_text())
    assert config == {**S.PHI2_CONFIG, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "num_key_value_heads": 4}
    assert (folder / "config.json").read_text() == json.dumps(config, indent=2, sort_keys=True) + "\n"
    assert json.loads((folder / "generation_config.json").read_text()) == S.PHI2_GENERATION_CONFIG
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"} and set(index["metadata"]) == {"total_size"}
    shards = sorted(folder.glob("*.safetensors"))
    assert [p.name for p in shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    total, stored = 0, {}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                tensor = f.get_tensor(name)
                assert str(tensor.dtype) == "torch.float16"
                stored[name] = shard.name
                total += tensor.numel() * 2
    assert stored == index["weight_map"] and total == index["metadata"]["total_size"]
    assert stored["lm_head.weight"] == shards[1].name and stored["model.embed_tokens.weight"] == shards[0].name


def test_phi2_loads_from_folder_and_by_hub_id(built):
    import torch
    from transformers import PhiForCausalLM

    layout, _ = built
    local = PhiForCausalLM.from_pretrained(str(layout.repo(S.PHI2_REPO)))
    assert local.dtype == torch.float16 and local.config.vocab_size == 51_200
    assert local.lm_head.bias.abs().min() > 0 and local.model.final_layernorm.bias.abs().sum() > 0
    for revision in (S.PHI2_REVISION, None):
        by_id = PhiForCausalLM.from_pretrained("microsoft/phi-2", revision=revision, cache_dir=str(layout.hub),
                                               local_files_only=True)
        assert torch.equal(by_id.lm_head.bias, local.lm_head.bias)


def test_hub_cache_layout_resolves(built):
    from huggingface_hub import hf_hub_download, snapshot_download

    layout, _ = built
    for repo, sha in S.STANDIN_REVISIONS.items():
        kind = S.REPO_TYPES[repo]
        folder = layout.hub / S.hub_folder_name(repo)
        assert (folder / "refs" / "main").read_text() == sha
        snapshot = Path(snapshot_download(repo, repo_type=kind, revision=sha, cache_dir=str(layout.hub),
                                          local_files_only=True))
        assert snapshot == folder / "snapshots" / sha
        for pointer in (p for p in snapshot.rglob("*") if p.is_symlink()):
            target = os.readlink(pointer)
            assert not os.path.isabs(target) and pointer.resolve().parent == (folder / "blobs").resolve()
        local_files = sorted(str(p.relative_to(layout.repo(repo))) for p in layout.repo(repo).rglob("*")
                             if p.is_file())
        assert sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_symlink()) == local_files
        path = hf_hub_download(repo, local_files[0], repo_type=kind, cache_dir=str(layout.hub), local_files_only=True)
        assert Path(path).read_bytes() == (layout.repo(repo) / local_files[0]).read_bytes()
    shard = layout.hub_snapshot(S.PHI2_REPO) / "model-00001-of-00002.safetensors"
    assert shard.resolve().name == hashlib.sha256(shard.read_bytes()).hexdigest()  # LFS blobs named by sha256


def test_clip_loads_with_real_preprocessing(built):
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModel

    layout, _ = built
    folder = layout.repo(S.CLIP_REPO)
    text = (folder / "config.json").read_text()
    assert '"projection_dim" : 32' in text and '"architectures": [\n    "CLIPModel"\n  ]' in text
    assert (folder / "preprocessor_config.json").stat().st_size == 316
    processor = CLIPImageProcessor.from_pretrained(str(folder))
    assert processor.crop_size == {"height": 224, "width": 224} and processor.size == {"shortest_edge": 224}
    tower = CLIPVisionModel.from_pretrained(str(folder)).eval()
    assert tower.config.image_size == 224 and tower.config.patch_size == 32
    pixels = processor(images=Image.new("RGB", (640, 480), "red"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert tower(pixel_values=pixels).last_hidden_state.shape == (1, 50, 32)


def test_coco_schema_and_images(built):
    import pyarrow as pa
    from PIL import Image

    layout, manifest = built
    folder = layout.repo(S.COCO_REPO)
    readme = (folder / "README.md").read_text()
    assert "dataset_info:" in readme and "splits:" not in readme
    expected = {"license": pa.int64(), "file_name": pa.string(), "coco_url": pa.string(), "height": pa.int64(),
                "width": pa.int64(), "date_captured": pa.string(), "flickr_url": pa.string(),
                "image_id": pa.int64(), "ids": pa.list_(pa.int64()), "captions": pa.list_(pa.string())}
    problems = manifest["bad_images"]
    for split, hub_split, n in (("train", "train", 64), ("val", "validation", 16)):
        table = read_parquet(folder / S.COCO_FILES[hub_split])
        assert table.num_rows == n and table.schema.names == list(expected)
        for name, kind in expected.items():
            assert table.schema.field(name).type.equals(kind, check_metadata=False) or (
                pa.types.is_list(kind) and table.schema.field(name).type.value_type == kind.value_type), name
        kinds = {}
        for row in table.to_pylist():
            assert row["coco_url"] == f"http://images.cocodataset.org/{split}2017/{row['file_name']}"
            assert row["file_name"] == f"{row['image_id']:012d}.jpg" and len(row["captions"]) == 5
            path = layout.coco_image_dir(split) / row["file_name"]
            if not path.exists():
                kinds.setdefault("missing", []).append(row["file_name"])
                continue
            try:
                with Image.open(path) as image:
                    image.load()
                    assert image.size == (row["width"], row["height"])
                    kinds.setdefault("grayscale" if image.mode == "L" else "ok", []).append(row["file_name"])
            except OSError as error:
                kind = "not_jpeg" if "identify" in str(error) else "truncated"
                kinds.setdefault(kind, []).append(row["file_name"])
        for kind in ("truncated", "not_jpeg", "grayscale", "missing"):
            assert sorted(kinds.get(kind, [])) == sorted(problems[split][kind])
        assert len(kinds["ok"]) >= n - 8
    assert all(problems["train"][kind] for kind in ("truncated", "not_jpeg", "grayscale", "missing"))
    sizes = {(r["width"], r["height"]) for r in read_parquet(folder / S.COCO_FILES["train"]).to_pylist()}
    assert len(sizes) >= 5 and any(w > h for w, h in sizes) and any(w < h for w, h in sizes)


def test_llava_records(built, tok):
    layout, _ = built
    records = json.loads((layout.repo(S.LLAVA_REPO) / S.LLAVA_FILE).read_text())
    train_images = {p.name for p in layout.coco_image_dir("train").iterdir()}
    train_rows = {r["file_name"] for r in read_parquet(layout.repo(S.COCO_REPO) / S.COCO_FILES["train"]).to_pylist()}
    assert isinstance(records, list) and 140 <= len(records) <= 160
    placements = set()
    for record in records:
        assert set(record) == {"id", "image", "conversations"} and record["image"] == record["id"] + ".jpg"
        assert record["image"] in train_rows
        turns = record["conversations"]
        assert 1 <= len(turns) // 2 <= 5 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        first = turns[0]["value"]
        assert sum(t["value"].count("<image>") for t in turns) == 1
        placements.add("before" if first.startswith("<image>\n") else "after" if first.endswith("\n<image>") else "?")
    assert placements == {"before", "after"}
    assert len({r["image"] for r in records}) < len(records)  # several records per image
    assert {r["image"] for r in records} & train_images
    longest = sorted(len(tok(t["value"])["input_ids"]) for r in records for t in r["conversations"])
    assert longest[-3] > 1_000 and longest[0] < 20


def test_llava_answers_are_grounded(built):
    """Answers name the scene's colour only (other colours only in denials) and colour questions get it right."""
    import re

    layout, _ = built
    scenes = json.loads(layout.scenes.read_text())["coco"]
    records = json.loads((layout.repo(S.LLAVA_REPO) / S.LLAVA_FILE).read_text())
    colours = {"red", "green", "blue", "yellow"}
    for record in records:
        colour = scenes[record["image"]]["things"][0]["colour"]
        turns = record["conversations"]
        for question, answer in zip(turns[0::2], turns[1::2]):
            for sentence in re.split(r"(?<=[.!?])\s+", answer["value"]):
                words = set(re.findall(r"[a-z]+", sentence.lower()))
                if (colours - {colour}) & words:
                    assert words & {"no", "nothing", "not", "zero"}, sentence
            if question["value"].replace("<image>", "").strip().startswith("What colour"):
                assert colour in answer["value"]


def test_tinystories_files(built):
    layout, manifest = built
    folder = layout.repo(S.TINYSTORIES_REPO)
    names = sorted(str(p.relative_to(folder)) for p in (folder / "data").iterdir())
    assert names == sorted([S.tinystories_file(i) for i in range(4)] + [S.TINYSTORIES_VALIDATION_FILE])
    assert names[0] == "data/train-00000-of-00004-2d5a1467fff1081b.parquet"
    first = read_parquet(folder / S.tinystories_file(0))
    assert first.schema.names == ["text"] and first.num_rows == 400
    stories = first.column("text").to_pylist()
    assert len(set(stories)) > 350 and all(len(s.split()) > 20 for s in stories)
    assert read_parquet(folder / S.TINYSTORIES_VALIDATION_FILE).num_rows == 50


def test_pope_files(built):
    from PIL import Image

    layout, _ = built
    folder = layout.repo(S.POPE_REPO)
    readme = (folder / "README.md").read_text()
    assert "configs:" in readme and "path: data/test-*" in readme and "splits:" not in readme
    tables = [read_parquet(folder / name) for name in S.POPE_FILES]
    assert tables[0].schema.names == ["id", "question_id", "question", "answer", "image_source", "image",
                                      "category"]
    assert str(tables[0].schema.field("image").type) == "struct<bytes: binary, path: string>"
    rows = [row for table in tables for row in table.to_pylist()]
    assert len(rows) == 12 * 3 * 2 and len({r["image_source"] for r in rows}) == 12
    for category in S.POPE_CATEGORIES:
        answers = [r["answer"] for r in rows if r["category"] == category]
        assert answers.count("yes") == answers.count("no") == 12
    for row in rows[:6]:
        assert row["question"].startswith("Is there a ") and row["question"].endswith(" in the image?")
        assert row["image_source"].startswith("COCO_val2014_") and row["image"]["path"] is None
        assert Image.open(io.BytesIO(row["image"]["bytes"])).format == "JPEG"


def test_whisper_checkpoint_format(built):
    import torch

    layout, manifest = built
    checkpoint = torch.load(layout.whisper, weights_only=True)
    assert set(checkpoint) == {"dims", "model_state_dict"}
    assert checkpoint["dims"] == manifest["spec"]["whisper_dims"]
    assert all(v.dtype == torch.float16 for v in checkpoint["model_state_dict"].values())


def test_everything_loads_offline_by_hub_id(built, tmp_path):
    """A fresh Python with HF_HUB_OFFLINE=1 and HF_HUB_CACHE=<root>/hub: snapshot/hf_hub_download, AutoConfig,
    AutoTokenizer, PhiForCausalLM, CLIPVisionModel, CLIPImageProcessor by hub id and revision, load_dataset of
    the local folders, whisper.load_model + transcribe."""
    layout, _ = built
    seen = S.check_standins_in_subprocess(layout.root, timeout=300,
                                          extra_env={"HF_DATASETS_CACHE": str(tmp_path / "datasets")})
    assert seen["phi2"]["generated"] == 3 and seen["clip"]["last_hidden_state"] == [1, 50, 32]
    assert seen["datasets"] == {"coco": {"train": 64, "validation": 16}, "pope": 72, "llava": 150}
    assert seen["whisper"]["multilingual"]
