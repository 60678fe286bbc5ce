"""Where the full profile's checkpoints and data sets come from: a Hub id or a local path, one setting each.

Every source (``helpers.config.SOURCES``: Phi-2, CLIP, COCO captions and images, LLaVA-Instruct, TinyStories,
Whisper, POPE, MMStar) is a string that is either

* a **local path** (absolute, ``./``, ``~``, or any path that exists): used as it is, after a check that it holds
  what the course expects; or
* a **Hub id** ``owner/name`` with an optional ``@revision``: fetched once into the Hugging Face cache
  (``HF_HUB_CACHE``), only the files the course reads, at the pinned revision (``config.PINNED_REVISIONS``) unless
  the id names another one. With ``HF_HUB_OFFLINE=1`` it is read from the cache alone.

A missing or malformed source stops with a :class:`SourceError` naming the setting, what was expected and where
it looked. Nothing falls back to another source silently.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from helpers.config import PINNED_REVISIONS, SOURCES

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
URL_SCHEMES = ("http://", "https://", "file://")

# what a source's folder must hold: each entry is a list of glob patterns of which one must match
EXPECTED = {
    "phi2": [["config.json"], ["*.safetensors", "pytorch_model*.bin"], ["tokenizer.json", "vocab.json"]],
    "clip": [["config.json"], ["preprocessor_config.json"], ["*.safetensors", "pytorch_model*.bin"]],
    "coco": [["data/train-*.parquet"], ["data/validation-*.parquet"]],
    "tinystories": [["data/train-*.parquet"]],
    "pope": [["data/test-*.parquet"]],
}
# what is fetched from the Hub (never a repository's unrelated files: CLIP's TF and Flax weights, TinyStories' txt)
HUB_FILES = {
    "phi2": ["*.json", "*.safetensors", "merges.txt", "vocab.json"],
    "clip": ["*.json", "*.safetensors", "pytorch_model.bin", "*.txt"],
    "coco": ["README.md", "data/train-*.parquet", "data/validation-*.parquet"],
    "pope": ["README.md", "data/test-*.parquet"],
}


class SourceError(ValueError):
    """A source setting that cannot be used; the message names the setting and what to do."""


def setting_label(key: str, spec: str | None) -> str:
    return f"{SOURCES[key].env} = {spec!r}"


def is_url(spec: str) -> bool:
    return spec.startswith(URL_SCHEMES)


def is_local(spec: str) -> bool:
    """A path rather than a Hub id: absolute, relative with ./ or ../, home-relative, or existing on disk."""
    return spec.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(spec))


def parse_hub_id(spec: str) -> tuple[str, str]:
    """``owner/name[@revision]`` -> (repo id, revision); the pinned revision when none is given."""
    match = HUB_ID.match(spec)
    if not match:
        raise ValueError(f"{spec!r} is not a Hub id of the form owner/name[@revision]")
    repo = match.group("repo")
    return repo, match.group("rev") or PINNED_REVISIONS.get(repo, "main")


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _spec(profile, key: str) -> str:
    spec = getattr(profile, SOURCES[key].fields[0])
    if not spec:
        raise SourceError(f"{SOURCES[key].env} is not set for the {profile.name!r} profile: give "
                          f"{SOURCES[key].what}.")
    return str(spec)


def check_folder(folder: Path, key: str, label: str) -> Path:
    """Raise :class:`SourceError` unless `folder` holds every file group :data:`EXPECTED` names for `key`."""
    missing = [" or ".join(group) for group in EXPECTED.get(key, [])
               if not any(any(folder.glob(pattern)) for pattern in group)]
    if missing:
        raise SourceError(f"{label}: expected {SOURCES[key].what}, but {folder} lacks {', '.join(missing)}.")
    return folder


def hub_snapshot(key: str, spec: str, allow_patterns: list[str] | None = None) -> Path:
    """The local snapshot folder of a Hub repository (downloaded once; only `allow_patterns`)."""
    from huggingface_hub import snapshot_download

    source = SOURCES[key]
    repo, revision = parse_hub_id(spec)
    try:
        return Path(snapshot_download(repo, repo_type=source.repo_type, revision=revision,
                                      allow_patterns=allow_patterns or HUB_FILES.get(key)))
    except Exception as exc:  # offline without a cached copy, unknown repo or revision, network errors
        raise SourceError(hub_failure(key, spec, revision, exc)) from exc


def hub_file(key: str, spec: str, filename: str) -> Path:
    """One file of a Hub repository (downloaded once)."""
    from huggingface_hub import hf_hub_download

    source = SOURCES[key]
    repo, revision = parse_hub_id(spec)
    try:
        return Path(hf_hub_download(repo, filename, repo_type=source.repo_type, revision=revision))
    except Exception as exc:
        raise SourceError(hub_failure(key, spec, revision, exc, filename)) from exc


def hub_failure(key: str, spec: str, revision: str, exc: Exception, filename: str | None = None) -> str:
    where = f"the Hugging Face Hub (revision {revision}, cache {_hub_cache()}" + \
            (", offline: cache only" if _offline() else "") + ")"
    what = f"{filename} of " if filename else ""
    return (f"{setting_label(key, spec)}: could not get {what}{SOURCES[key].what} from {where}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Set {SOURCES[key].env} "
            f"(or the notebook's SETTINGS) to a local copy, or check the network and the revision.")


def source_folder(profile, key: str, allow_patterns: list[str] | None = None) -> Path:
    """The local folder of source `key` (a model checkpoint or a data set), checked for the expected files."""
    spec = _spec(profile, key)
    label = setting_label(key, spec)
    if is_local(spec):
        folder = Path(os.path.expanduser(spec))
        if not folder.is_dir():
            raise SourceError(f"{label}: expected {SOURCES[key].what}, but {folder} "
                              f"{'is a file' if folder.exists() else 'does not exist'}.")
        return check_folder(folder, key, label)
    if is_url(spec) or not HUB_ID.match(spec):
        raise SourceError(f"{label}: neither an existing local path nor a Hub id (owner/name[@revision]); "
                          f"expected {SOURCES[key].what}.")
    return check_folder(hub_snapshot(key, spec, allow_patterns), key, label)


def model_path(profile, key: str) -> str:
    """What ``from_pretrained`` gets for a model source: its checked local folder."""
    return str(source_folder(profile, key))


def source_file(profile, key: str, filename: str) -> Path:
    """A single-file source: a local file, a local folder holding `filename`, or `filename` of a Hub repository."""
    spec = _spec(profile, key)
    label = setting_label(key, spec)
    if is_local(spec):
        path = Path(os.path.expanduser(spec))
        path = path / filename if path.is_dir() else path
        if not path.is_file():
            raise SourceError(f"{label}: expected {SOURCES[key].what}, but {path} does not exist.")
        return path
    if not HUB_ID.match(spec):
        raise SourceError(f"{label}: neither an existing local path nor a Hub id (owner/name[@revision]).")
    return hub_file(key, spec, filename)


def parquet_files(folder: Path, pattern: str, key: str, spec: str) -> list[Path]:
    files = sorted(folder.glob(pattern))
    if not files:
        raise SourceError(f"{setting_label(key, spec)}: no {pattern} in {folder}.")
    return files


def image_base(profile) -> str:
    """The COCO image source as a URL base: a folder becomes a ``file://`` URL, so one download path serves both."""
    spec = _spec(profile, "coco_images")
    if is_url(spec):
        return spec.rstrip("/")
    folder = Path(os.path.expanduser(spec))
    if not folder.is_dir():
        raise SourceError(f"{setting_label('coco_images', spec)}: expected {SOURCES['coco_images'].what}, "
                          f"but {folder} does not exist.")
    return folder.resolve().as_uri()


def describe(profile) -> list[dict]:
    """One row per source: setting, value, kind (Hub id / local path / URL) and revision, for the notebooks."""
    rows = []
    for key, source in SOURCES.items():
        spec = getattr(profile, source.fields[0])
        if not spec:
            continue
        kind = "URL" if is_url(spec) else "local path" if is_local(spec) else "Hub id"
        revision = parse_hub_id(spec)[1] if kind == "Hub id" and HUB_ID.match(spec) else ""
        if key == "whisper" and kind == "Hub id":
            kind = "Whisper model name"
        rows.append({"setting": source.env, "value": spec, "kind": kind, "revision": revision})
    return rows
