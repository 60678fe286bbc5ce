"""Checkpoints that survive a crash: written atomically, validated before use, resumed automatically.

Every training stage runs transformers' Trainer, which can save ``checkpoint-<step>`` folders (model or LoRA
adapter weights as safetensors, optimizer, scheduler, RNG states, ``trainer_state.json``) and resume from one with
everything restored, including the position in the data. Two gaps are closed here:

* **atomic writes** – Trainer writes straight into ``checkpoint-<step>``; a process killed half-way leaves a
  folder that looks like the newest checkpoint. :class:`AtomicCheckpointMixin` (used by every stage's trainer)
  writes into ``.staging/checkpoint-<step>`` and renames the finished folder into place, so a ``checkpoint-*``
  folder is either complete or absent.
* **validation** – a checkpoint can still be damaged later (a full disk, a truncated copy).
  :func:`latest_valid_checkpoint` checks each ``checkpoint-<step>`` newest first (expected files present, safetensors headers consistent with the
  file size, torch pickles complete, ``trainer_state.json`` parseable, the run's settings unchanged) and says why it
  skips one, so training falls back to the previous checkpoint instead of crashing or resuming from garbage.

File formats: weights are safetensors (safe to download and share). ``optimizer.pt``, ``scheduler.pt``,
``rng_state*.pth`` and ``training_args.bin`` are Trainer's own *internal resume state*, written with torch.save
(pickle): load them only from checkpoints you made yourself; never share or download them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"
SETTINGS_FILE = "run_settings.json"  # the settings a checkpoint was made with (ours, not Trainer's)
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json")
# settings that must match for a checkpoint to be resumed (others, e.g. the number of processes, may change)
RESUME_KEYS = ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "seed",
               "n_examples")


def _say(message: str, verbose: bool = True):
    if verbose:
        print(message, flush=True)


def checkpoints(output_dir) -> list[Path]:
    """``checkpoint-<step>`` folders of `output_dir`, newest (highest step) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def check_safetensors(path) -> None:
    """Raise ValueError unless `path` is a complete safetensors file (header parses, data fills the file)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name} is truncated ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path.name} is truncated (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path.name} has an unreadable header ({e})") from None
    end = max([0] + [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"])
    if 8 + n + end != size:
        raise ValueError(f"{path.name} is truncated or damaged: {8 + n + end} bytes expected, {size} found")


def check_torch_file(path) -> None:
    """Raise ValueError unless `path` (torch.save's zip format) is complete. Its content is not unpickled."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path.name} is truncated or damaged ({e})") from None
    if bad is not None:
        raise ValueError(f"{path.name} is damaged (bad entry {bad})")


def checkpoint_problem(checkpoint, settings: dict | None = None) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it looks complete and matches `settings`."""
    ckpt = Path(checkpoint)
    state_file = ckpt / "trainer_state.json"
    if not state_file.exists():
        return "trainer_state.json is missing"
    try:
        state = json.loads(state_file.read_text())
        step = int(state["global_step"])
    except (ValueError, KeyError, TypeError) as e:
        return f"trainer_state.json is unreadable ({e.__class__.__name__}: {e})"
    m = CHECKPOINT_RE.match(ckpt.name)
    if m and int(m.group(1)) != step:
        return f"trainer_state.json says step {step}, the folder name step {m.group(1)}"
    weights = [ckpt / name for name in WEIGHT_FILES if (ckpt / name).exists()]
    if not weights:
        return "no model or adapter weights (model.safetensors / adapter_model.safetensors)"
    shards = []
    for w in weights:
        if w.name.endswith(".index.json"):
            try:
                shards += [ckpt / s for s in set(json.loads(w.read_text())["weight_map"].values())]
            except (ValueError, KeyError) as e:
                return f"{w.name} is unreadable ({e})"
        else:
            shards.append(w)
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (ckpt / name).exists():
            return f"{name} is missing"
    rng = sorted(ckpt.glob("rng_state*.pth"))
    if not rng:
        return "no RNG state (rng_state*.pth)"
    try:
        for s in shards:
            if not s.exists():
                return f"{s.name} is missing"
            check_safetensors(s)
        for t in [ckpt / "optimizer.pt", ckpt / "scheduler.pt", *rng]:
            check_torch_file(t)
    except ValueError as e:
        return str(e)
    if settings:
        saved_file = ckpt / SETTINGS_FILE
        if saved_file.exists():
            try:
                saved = json.loads(saved_file.read_text())
            except ValueError as e:
                return f"{SETTINGS_FILE} is unreadable ({e})"
            changed = [f"{k} {saved[k]} -> {settings[k]}" for k in RESUME_KEYS
                       if k in saved and k in settings and saved[k] != settings[k]]
            if changed:
                return "it was made with other settings (" + ", ".join(changed) + ")"
    return None


def latest_valid_checkpoint(output_dir, settings: dict | None = None, verbose: bool = True) -> Path | None:
    """The newest ``checkpoint-<step>`` in `output_dir` that passes :func:`checkpoint_problem`, or None.

    Each rejected (newer) checkpoint is reported with the reason, e.g. a truncated weights file."""
    for ckpt in checkpoints(output_dir):
        problem = checkpoint_problem(ckpt, settings)
        if problem is None:
            return ckpt
        _say(f"Skipping checkpoint {ckpt}: {problem}. Trying the previous one.", verbose)
    return None


def resolve_resume(output_dir, resume=None, settings: dict | None = None, verbose: bool = True) -> str | None:
    """The checkpoint to resume from, or None to start afresh.

    resume: None or True = the latest valid checkpoint when there is one (automatic); False = start afresh;
    a path = that checkpoint (validated; an error when it is unusable)."""
    if resume is False:
        return None
    if resume not in (None, True):
        problem = checkpoint_problem(resume, settings)
        if problem:
            raise ValueError(f"cannot resume from {resume}: {problem}")
        return str(resume)
    found = latest_valid_checkpoint(output_dir, settings, verbose)
    if found is None:
        if checkpoints(output_dir):
            _say(f"No usable checkpoint in {output_dir}: training from the start.", verbose)
        return None
    try:
        state = json.loads((found / "trainer_state.json").read_text())
        done = f" ({state['global_step']}/{state.get('max_steps', '?')} steps done)"
    except (ValueError, KeyError):
        done = ""
    _say(f"Resuming from {found}{done}. Pass resume=False (--no-resume) to train from the start.", verbose)
    return str(found)


def clear_checkpoints(output_dir, verbose: bool = True) -> None:
    """Remove old ``checkpoint-*`` folders (and unfinished staging) so a fresh run's are not mixed with them."""
    old = checkpoints(output_dir)
    for ckpt in old:
        shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(Path(output_dir) / STAGING, ignore_errors=True)
    if old:
        _say(f"Starting afresh: removed {len(old)} old checkpoint(s) from {output_dir}.", verbose)


def rotate(output_dir, keep: int | None) -> None:
    """Keep the `keep` newest checkpoints (by step)."""
    if not keep or keep <= 0:
        return
    for ckpt in checkpoints(output_dir)[keep:]:
        shutil.rmtree(ckpt, ignore_errors=True)


class AtomicCheckpointMixin:
    """Mix into a transformers Trainer: each checkpoint is written into ``<output_dir>/.staging/`` and renamed into
    place when complete (all processes finished writing), then old ones are rotated (``save_total_limit``).

    ``run_settings`` (a dict) is stored with each checkpoint as ``run_settings.json``; :func:`checkpoint_problem`
    refuses to resume a checkpoint made with other settings."""

    run_settings: dict | None = None
    _staging_save = False

    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._staging_save else run_dir

    def _save_checkpoint(self, model, trial):
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staged = os.path.join(run_dir, STAGING, name)
        if self.args.should_save and os.path.isdir(staged):  # left over from a crash
            shutil.rmtree(staged)
        self.accelerator.wait_for_everyone()
        self._staging_save = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_save = False
        if self.args.should_save and self.run_settings is not None:
            Path(staged, SETTINGS_FILE).write_text(json.dumps(self.run_settings, indent=1))
        self.accelerator.wait_for_everyone()  # every rank has written its part (e.g. its RNG state)
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):  # an older checkpoint of the same step: move it away first
                old = os.path.join(run_dir, STAGING, name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            _fsync_tree(staged)
            os.replace(staged, final)  # atomic on one file system
            rotate(run_dir, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()


def _fsync_tree(folder) -> None:
    """Flush the checkpoint's files to disk before the rename makes it visible (best effort)."""
    for p in Path(folder).rglob("*"):
        if p.is_file():
            try:
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass
