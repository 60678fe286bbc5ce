"""Training survives a crash: a stage's process is killed with SIGKILL mid-run, resumed from its last checkpoint, and
ends exactly where an uninterrupted run ends. A damaged newest checkpoint is skipped with a message and the previous
one used.

What "resumed" means is checked from inside Trainer, not from what the course prints: the resumed process records
the step Trainer starts at (``on_train_begin``), the optimizer steps it really runs, and a fingerprint of every
micro-batch it feeds the model. It must start at the checkpoint's step, run only the remaining steps, feed the very
micro-batches the uninterrupted run fed at those steps (the data position, including the length-balanced sampler's
order in stage 03, where an optimizer batch is cut into two micro-batches), and end bit-identical to the
uninterrupted run: SHA-256 of every trainable tensor, of the optimizer state (AdamW's moments and step counts) and
of the scheduler state.

Bugs these tests catch (each checked by planting it): ``trainer.train(resume_from_checkpoint=None)`` (a run that
silently restarts from step 0 reaches the same weights on a deterministic CPU, but starts at step 0 and runs all
steps); resuming with ``ignore_data_skip=True`` or a sampler whose order is not restored (other micro-batches);
a checkpoint that loses the optimizer or scheduler state (different hashes); a damaged checkpoint used anyway.

This file is also the worker the tests start (``python tests/test_resume.py <stage> ...``): it runs one stage's
training (the notebook's own cells, run with helpers.course.run_cells) on the tests' small world for 12 steps,
checkpointing every 4.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS, SAVE_EVERY = 12, 4


# ------------------------------------------------------------------------------------------------ the worker
def _profile(stage: str):
    import dataclasses

    from helpers.config import TINY, StageSpec

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import SMALL_WORLD

    spec = {"pretrain": StageSpec(learning_rate=3e-3, batch_size=8, max_steps=STEPS, logging_steps=1),
            "projection": StageSpec(learning_rate=1e-2, batch_size=8, max_steps=STEPS, logging_steps=1,
                                    max_length=128),
            # two micro-batches per optimizer step: the length-balanced sampler cuts each drawn batch of 4
            "instruct": StageSpec(learning_rate=2e-3, batch_size=2, grad_accum=2, max_steps=STEPS, logging_steps=1,
                                  max_length=160)}[stage]
    return dataclasses.replace(TINY, world=SMALL_WORLD, **{stage: spec})


def _recorder(pause_at: int, marker: Path):
    """A callback that records what Trainer really does in this process: the step it starts at, the optimizer steps
    it runs, and a fingerprint of each micro-batch the model is fed (by a forward pre-hook). With `pause_at` it
    stands still after that step so the test can kill the process there."""
    import hashlib

    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.start_step, self.steps_run, self.batches, self._hook, self._step = None, 0, {}, None, None
            self.sampler = None

        def _fingerprint(self, module, args, kwargs):
            if self._step is None:
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            digest = hashlib.sha256(ids.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
            self.batches.setdefault(str(self._step), []).append(digest)

        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            self.start_step = state.global_step  # after Trainer restored the checkpoint's state
            self._hook = model.register_forward_pre_hook(self._fingerprint, with_kwargs=True)
            self.sampler = _sampler_name(train_dataloader)

        def on_step_begin(self, args, state, control, **kwargs):
            self._step = state.global_step + 1

        def on_step_end(self, args, state, control, **kwargs):
            self.steps_run += 1
            self._step = None
            if pause_at and state.global_step == pause_at:
                marker.write_text(str(pause_at))
                time.sleep(600)

        def on_train_end(self, args, state, control, **kwargs):
            self._step = None
            if self._hook is not None:
                self._hook.remove()

    return Recorder()


def _sampler_name(dataloader) -> str | None:
    """The class of the sampler that orders the training examples (inside accelerate's dataloader wrappers)."""
    wrappers = ("BatchSampler", "BatchSamplerShard", "SequentialSampler")
    for path in ("batch_sampler.batch_sampler", "batch_sampler", "batch_sampler.sampler", "sampler",
                 "batch_sampler.batch_sampler.sampler"):
        obj = dataloader
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        if obj is not None and type(obj).__name__ not in wrappers:
            return type(obj).__name__
    return None


def _state_sha256(trainer, model) -> dict:
    """SHA-256 of the full trainable tensors, the optimizer state and the scheduler state (not sums: every bit)."""
    import hashlib

    import torch

    def digest(obj, h):
        if isinstance(obj, torch.Tensor):
            h.update(str((obj.dtype, tuple(obj.shape))).encode())
            h.update(obj.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                h.update(repr(k).encode())
                digest(obj[k], h)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                digest(item, h)
        else:
            h.update(repr(obj).encode())
        return h

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return {"weights": digest(trainable, hashlib.sha256()).hexdigest(),
            "optimizer": digest(trainer.optimizer.state_dict(), hashlib.sha256()).hexdigest(),
            "scheduler": digest(trainer.lr_scheduler.state_dict(), hashlib.sha256()).hexdigest()}


def worker(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=["pretrain", "projection", "instruct"])
    parser.add_argument("--world", required=True)
    parser.add_argument("--tok", required=True)
    parser.add_argument("--llava", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--pause-at", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from helpers.config import Paths
    from helpers.data.tokenizer import load_tokenizer
    from helpers.data.world import WorldFiles

    profile = _profile(args.stage)
    paths = Paths(profile, args.out)
    tok = load_tokenizer(args.tok)
    world = WorldFiles(Path(args.world))
    recorder = _recorder(args.pause_at, Path(args.result + ".paused"))
    if args.stage == "pretrain":  # notebook 01's own cells: blocks, model, trainer, then training
        from helpers.course import run_cells
        from helpers.train.pretrain import mean_loss, read_corpus

        cells = run_cells("01_pretrain_phi", ["blocks", "model", "trainer"], profile=profile, paths=paths, tok=tok,
                          documents=read_corpus(world.corpus), SAVE_STEPS=SAVE_EVERY)
        cells["trainer"].add_callback(recorder)
        cells = run_cells("01_pretrain_phi", ["train"], **cells, RESUME=None)
        trainer, model = cells["trainer"], cells["model"]
        final = mean_loss(model, cells["heldout"])
    elif args.stage == "projection":  # notebook 02's own cells: freezing, features, trainer, then training
        from transformers import LlavaForConditionalGeneration

        from helpers.course import run_cells
        from helpers.data.multimodal_data import read_coco_captions
        from helpers.models.modeling import image_processor
        from helpers.train.projection import mean_conversation_loss

        records, _ = read_coco_captions(world.captions("train"), world.images("train"))
        cells = run_cells("02_projection", ["freeze", "features", "trainer"],
                          model=LlavaForConditionalGeneration.from_pretrained(args.llava), profile=profile,
                          paths=paths, tok=tok, image_proc=image_processor(profile.vision), train_records=records,
                          val_records=records[:8], SAVE_STEPS=SAVE_EVERY)
        cells["trainer"].add_callback(recorder)
        cells = run_cells("02_projection", ["train"], **cells, RESUME=None)
        trainer, model = cells["trainer"], cells["model"]
        final = mean_conversation_loss(model, cells["dataset"], tok)
    else:  # notebook 03's own cells: the 4-bit model, the cached features, LoRA, the trainer, then training
        from transformers import AutoProcessor

        from helpers.course import run_cells
        from helpers.data.multimodal_data import read_llava_instruct
        from helpers.train.projection import mean_conversation_loss

        records, _ = read_llava_instruct(world.instruct("train"), world.images("train"))
        processor = AutoProcessor.from_pretrained(args.llava)
        cells = run_cells("03_qlora_instruct", ["load-4bit", "features", "lora", "trainer"], checkpoint=args.llava,
                          processor=processor, tok=processor.tokenizer, profile=profile, paths=paths,
                          train_records=records, val_records=records[:4], SAVE_STEPS=SAVE_EVERY)
        cells["trainer"].add_callback(recorder)
        cells = run_cells("03_qlora_instruct", ["train"], **cells, RESUME=None)
        trainer, model = cells["trainer"], cells["model"]
        final = mean_conversation_loss(model, cells["dataset"], tok)
    rows = [(r["step"], r["loss"]) for r in trainer.state.log_history if "loss" in r]
    result = {"losses": rows, "final_loss": final, "global_step": trainer.state.global_step,
              "start_step": recorder.start_step, "steps_run": recorder.steps_run, "batches": recorder.batches,
              "sampler": recorder.sampler,
              "n_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "sha256": _state_sha256(trainer, model)}
    Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------- the tests
def _command(stage, world, tok_dir, llava, out, result, pause_at=0):
    cmd = [sys.executable, str(Path(__file__).resolve()), stage, "--world", str(world.root), "--tok", str(tok_dir),
           "--llava", str(llava), "--out", str(out), "--result", str(result)]
    return cmd + (["--pause-at", str(pause_at)] if pause_at else [])


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env.pop("MMPHI_OUTPUT_DIR", None)
    return env


def _start(cmd, log: Path):
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _finish(proc, log: Path, timeout=240):
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f"worker failed ({rc}):\n{log.read_text()[-4000:]}"
    return log.read_text()


def _wait_for(path: Path, proc, log: Path, timeout=240):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"worker ended before pausing:\n{log.read_text()[-4000:]}"
        assert time.time() < deadline, "worker did not reach the pause step"
        time.sleep(0.2)


_UNINTERRUPTED: dict[str, dict] = {}  # stage -> result of its uninterrupted run (shared by the tests of a stage)


def _crash_and_resume(stage, world, tok_dir, llava, tmp_path, kill_at, damage=None):
    """Run `stage` uninterrupted and (in parallel) until `kill_at`, SIGKILL the latter, optionally damage its
    checkpoints, resume it. Returns (uninterrupted result, resumed result, resumed log, trainer dir)."""
    full_out, crash_out = tmp_path / "full", tmp_path / "crash"
    full = None
    if stage not in _UNINTERRUPTED:
        full = _start(_command(stage, world, tok_dir, llava, full_out, tmp_path / "full.json"),
                      tmp_path / "full.log")
    crash_result = tmp_path / "crash.json"
    crash = _start(_command(stage, world, tok_dir, llava, crash_out, crash_result, pause_at=kill_at),
                   tmp_path / "crash.log")
    _wait_for(Path(str(crash_result) + ".paused"), crash, tmp_path / "crash.log")
    os.kill(crash.pid, signal.SIGKILL)
    crash.wait(timeout=30)
    assert crash.returncode == -signal.SIGKILL
    stage_dir = {"pretrain": "01_pretrain", "projection": "02_projection", "instruct": "03_qlora_instruct"}[stage]
    trainer_dir = crash_out / "tiny" / stage_dir / "trainer"
    if damage:
        damage(trainer_dir)
    resumed = _start(_command(stage, world, tok_dir, llava, crash_out, crash_result), tmp_path / "resumed.log")
    log = _finish(resumed, tmp_path / "resumed.log")
    if full is not None:
        _finish(full, tmp_path / "full.log")
        _UNINTERRUPTED[stage] = json.loads((tmp_path / "full.json").read_text())
    return _UNINTERRUPTED[stage], json.loads(crash_result.read_text()), log, trainer_dir


def _assert_same_run(full, resumed, resumed_at: int):
    """The resumed process started at checkpoint `resumed_at`, ran only the remaining steps on the micro-batches the
    uninterrupted run used there, and ended bit-identical to it."""
    assert full["start_step"] == 0 and full["steps_run"] == STEPS == full["global_step"]
    assert resumed["start_step"] == resumed_at, f"Trainer started at step {resumed['start_step']}, not {resumed_at}"
    assert resumed["steps_run"] == STEPS - resumed_at, f"ran {resumed['steps_run']} steps"
    assert resumed["global_step"] == STEPS
    assert sorted(resumed["batches"], key=int) == [str(s) for s in range(resumed_at + 1, STEPS + 1)]
    assert all(resumed["batches"][s] == full["batches"][s] for s in resumed["batches"]), "other micro-batches"
    assert [s for s, _ in full["losses"]] == list(range(1, STEPS + 1))
    assert resumed["losses"] == full["losses"]  # every step's loss, bit for bit (the first ones from the checkpoint)
    assert resumed["final_loss"] == full["final_loss"]
    assert resumed["sha256"] == full["sha256"]  # weights, optimizer and scheduler state


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("resume_tok")
    tok.save_pretrained(path)
    return path


def _checkpoint_steps(trainer_dir):
    from helpers.train.checkpointing import checkpoints

    return sorted(int(p.name.split("-")[1]) for p in checkpoints(trainer_dir))


def test_pretrain_resumes_bit_exactly_after_sigkill(world, tok_dir, tmp_path):
    full, resumed, log, trainer_dir = _crash_and_resume("pretrain", world, tok_dir, "-", tmp_path,
                                                        kill_at=6)
    assert "Resuming from" in log and "checkpoint-4" in log
    _assert_same_run(full, resumed, resumed_at=4)
    assert _checkpoint_steps(trainer_dir) == [8, 12]  # save_total_limit = 2
    assert not any((trainer_dir / ".staging").glob("checkpoint-*"))


def test_projection_resumes_bit_exactly_after_sigkill(world, tok_dir, saved_llava, tmp_path):
    full, resumed, log, trainer_dir = _crash_and_resume("projection", world, tok_dir, saved_llava,
                                                        tmp_path, kill_at=7)
    assert "checkpoint-4" in log
    _assert_same_run(full, resumed, resumed_at=4)
    # stage-02 checkpoints hold the trainable projector only, not the frozen LLM and vision tower
    from safetensors import safe_open

    with safe_open(str(trainer_dir / "checkpoint-12" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("multi_modal_projector" in k for k in keys)


def test_qlora_resumes_adapters_projector_and_optimizer_after_sigkill(world, tok_dir, saved_llava, tmp_path):
    full, resumed, log, trainer_dir = _crash_and_resume("instruct", world, tok_dir, saved_llava,
                                                        tmp_path, kill_at=5)
    assert "checkpoint-4" in log
    # two micro-batches per step, cut by length from each drawn batch: the sampler's position is resumed too
    assert full["sampler"] == resumed["sampler"] == "BatchRebalanceSampler"
    _assert_same_run(full, resumed, resumed_at=4)
    from safetensors import safe_open

    with safe_open(str(trainer_dir / "checkpoint-12" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("lora_A" in k for k in keys) and any("multi_modal_projector" in k for k in keys)
    assert not (trainer_dir / "checkpoint-12" / "model.safetensors").exists()  # no copy of the 4-bit LLM


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(world, tok_dir, tmp_path):
    def truncate(trainer_dir):
        weights = trainer_dir / "checkpoint-8" / "model.safetensors"
        assert weights.exists() and (trainer_dir / "checkpoint-4").exists()
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    full, resumed, log, _ = _crash_and_resume("pretrain", world, tok_dir, "-", tmp_path, kill_at=10,
                                              damage=truncate)
    assert "Skipping checkpoint" in log and "checkpoint-8: model.safetensors is truncated" in log, log[-3000:]
    assert "Resuming from" in log and "checkpoint-4 (4/12 steps done)" in log
    _assert_same_run(full, resumed, resumed_at=4)


def test_checkpoint_validation_reasons(tmp_path, capsys):
    """Unit level: what makes a checkpoint unusable, and that a staging folder is never taken for a checkpoint."""
    import torch
    from safetensors.torch import save_file

    from helpers.train.checkpointing import checkpoint_problem, latest_valid_checkpoint, resolve_resume

    def make(step, settings=None):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        save_file({"w": torch.ones(3)}, str(ckpt / "model.safetensors"))
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            torch.save({"x": torch.zeros(2)}, ckpt / name)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 12}))
        if settings:
            (ckpt / "run_settings.json").write_text(json.dumps(settings))
        return ckpt

    a, b, c = make(4), make(8, {"max_steps": 12}), make(12)
    (tmp_path / ".staging" / "checkpoint-16").mkdir(parents=True)
    assert checkpoint_problem(a) is None
    (c / "trainer_state.json").write_text("{not json")
    assert "trainer_state.json is unreadable" in checkpoint_problem(c)
    assert "other settings (max_steps 12 -> 20)" in checkpoint_problem(b, {"max_steps": 20})
    opt = (b / "optimizer.pt").read_bytes()
    (b / "optimizer.pt").write_bytes(opt[:-10])
    assert "optimizer.pt is truncated or damaged" in checkpoint_problem(b)
    assert latest_valid_checkpoint(tmp_path) == a
    out = capsys.readouterr().out
    assert "checkpoint-12: trainer_state.json is unreadable" in out and "checkpoint-8: optimizer.pt" in out
    assert resolve_resume(tmp_path, resume=False) is None
    with pytest.raises(ValueError, match="cannot resume from"):
        resolve_resume(tmp_path, resume=str(b))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    worker()
