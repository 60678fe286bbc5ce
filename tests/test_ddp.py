"""Stage 03 (QLoRA, 4-bit bitsandbytes + LoRA + projector) runs data-parallel: two CPU processes under
``accelerate launch --config_file configs/accelerate/ddp.yaml`` (on a machine without CUDA the same config starts
torch.distributed with gloo), as it would on two GPUs, and learns.

Note: ``accelerate launch --cpu --num_processes 2`` starts a *single* process in accelerate 1.x (several CPU
processes need mpirun there); ``--multi_gpu --num_processes 2`` or the DDP config file start two."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6


def test_instruct_stage_under_accelerate_launch_with_two_cpu_processes(world, saved_llava, tmp_path):
    from helpers.config import TINY, Paths
    from helpers.train.checkpointing import checkpoints, latest_valid_checkpoint

    paths = Paths(TINY, tmp_path)
    # the earlier stages' outputs, as a single-process run would leave them: a stage-02 LLaVA checkpoint with its
    # processor; stage 03 only reads the projection checkpoint, the base LM and vision tower folders just have to
    # exist for the launcher's prerequisite check. The world copied here was built with other settings than the
    # launched profile's (a small world, no type weights): the main process must rebuild it while the other rank
    # waits (two ranks rebuilding one folder at once delete each other's images)
    shutil.copytree(world.root, paths.world)
    shutil.copytree(saved_llava, paths.projection)
    for folder in (paths.base_lm, paths.clip):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")

    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", "configs/accelerate/ddp.yaml", "--num_processes", "2",
           "scripts/train_stage.py", "instruct", "--profile", "tiny", "--output", str(tmp_path),
           "--max-steps", str(STEPS), "--logging-steps", "1", "--batch-size", "4"]
    small = "world.n_train_images=48,world.n_heldout_images=12,world.n_corpus_scenes=400,world.world_seed=7"
    env = dict(os.environ, MMPHI_SETTINGS=small, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    env.pop("MMPHI_OUTPUT_DIR", None)
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-5000:]
    assert '"processes": 2' in run.stdout, run.stdout[-3000:]

    trainer_dir = paths.instruct / "trainer"
    newest = latest_valid_checkpoint(trainer_dir)
    assert newest is not None and newest.name == f"checkpoint-{STEPS}", [p.name for p in checkpoints(trainer_dir)]
    # one RNG state per process: each rank resumes its own random stream
    assert sorted(p.name for p in newest.glob("rng_state*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    state = json.loads((newest / "trainer_state.json").read_text())
    losses = [row["loss"] for row in state["log_history"] if "loss" in row]
    assert len(losses) == STEPS, state["log_history"]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses
    metrics = json.loads((paths.metrics / "03_qlora_instruct.json").read_text())
    assert metrics["steps"] == STEPS
    assert (paths.assistant / "config.json").exists()  # rank 0 exported the merged assistant
