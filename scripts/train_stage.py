"""Run one stage of the course from the command line (what a notebook runs), on one device or several.

    python scripts/train_stage.py pretrain   --profile tiny
    python scripts/train_stage.py projection --profile tiny
    python scripts/train_stage.py instruct   --profile full --output /data/mmphi

The stages use transformers' Trainer, so the same command runs data-parallel on several GPUs under accelerate:

    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train_stage.py projection --profile full

Single process: a missing earlier stage is run on the spot (as in the notebooks). Several processes: earlier stages
must exist already (run them once single-process first); vision features are cached by the main process before the
others read the cache; each rank pins its own GPU. Results and metrics land in ``<output>/<profile>/``.

Crash-safe: checkpoints are written atomically to ``<output>/<profile>/<stage>/trainer/checkpoint-<step>`` every
``--save-steps`` steps (default: every 25 % of the run; the newest 2 are kept) and a rerun of the same command resumes
from the newest valid one (``--no-resume`` starts afresh). Several processes also work on CPUs (gloo); the DDP config
does it on a machine without CUDA (``accelerate launch --cpu --num_processes 2`` starts only one process):

    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/train_stage.py instruct --profile tiny \
        --max-steps 8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGES = {"pretrain": "pretrain_stage", "projection": "projection_stage", "instruct": "instruct_stage"}
SPEC_FIELD = {"pretrain": "pretrain", "projection": "projection", "instruct": "instruct"}


def with_overrides(profile, stage: str, batch_size=None, grad_accum=None, max_steps=None, logging_steps=None):
    """The profile with the stage's StageSpec changed, e.g. gradient accumulation divided by the GPU count to keep
    the recipe's global batch (per-device batch x accumulation x processes)."""
    import dataclasses

    changes = {k: v for k, v in dict(batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps,
                                     logging_steps=logging_steps).items() if v is not None}
    if not changes:
        return profile
    field = SPEC_FIELD[stage]
    return profile.replace(**{field: dataclasses.replace(getattr(profile, field), **changes)})


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def pin_local_gpu() -> None:
    """Under accelerate/torchrun every rank must use its own GPU, also for the models a stage builds before the
    Trainer exists (``.to("cuda")`` means the *current* device)."""
    import torch

    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def missing_prerequisites(stage: str, profile, paths) -> list[str]:
    missing = []
    if stage in ("projection", "instruct"):
        if not profile.llm_checkpoint and not (paths.base_lm / "config.json").exists():
            missing.append(f"pretrain (no base LM at {paths.base_lm})")
        if not profile.clip_checkpoint and not (paths.clip / "config.json").exists():
            missing.append(f"the vision tower (none at {paths.clip}; the projection stage trains it)")
    if stage == "instruct" and not (paths.projection / "config.json").exists():
        missing.append(f"projection (no stage-02 checkpoint at {paths.projection})")
    return missing


def cache_features_on_main_process_first() -> None:
    """Every rank asks for the same vision-feature cache: let the main process compute and write it, then the
    others read it (instead of all writing one file at once)."""
    import torch
    from accelerate import PartialState

    import helpers.projection as projection

    state = PartialState(cpu=not torch.cuda.is_available())  # on CPUs (gloo) accelerate must be told
    compute = projection.feature_table

    def feature_table(*args, **kwargs):
        with state.main_process_first():
            return compute(*args, **kwargs)

    projection.feature_table = feature_table  # helpers.stages imports it when the stage runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--profile", default=None, help="tiny or full (default: $MMPHI_PROFILE, else by hardware)")
    parser.add_argument("--output", default=None, help="output root (default: $MMPHI_OUTPUT_DIR or ./outputs)")
    parser.add_argument("--batch-size", type=int, help="per-device batch size (default: the profile's)")
    parser.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default: the profile's)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (smoke tests)")
    parser.add_argument("--logging-steps", type=int, help="log the loss every this many steps")
    parser.add_argument("--save-steps", type=int, default=None,
                        help="checkpoint every this many steps (default: every 25%% of the run; 0: never)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="resume from the newest valid checkpoint of this stage (default) or start afresh")
    parser.add_argument("--resume-from", default=None, help="resume from this checkpoint folder")
    args = parser.parse_args(argv)

    pin_local_gpu()
    from helpers import stages
    from helpers.config import Paths, get_profile

    profile = with_overrides(get_profile(args.profile), args.stage, args.batch_size, args.grad_accum, args.max_steps,
                             args.logging_steps)
    os.environ.setdefault("MMPHI_PROFILE", profile.name)
    paths = Paths(profile, args.output)
    if world_size() > 1:
        missing = missing_prerequisites(args.stage, profile, paths)
        if missing:
            print("Run these first, in a single process (python scripts/train_stage.py <stage>): "
                  + "; ".join(missing), file=sys.stderr)
            return 2
        cache_features_on_main_process_first()
    start = time.perf_counter()
    resume = args.resume_from or (None if args.resume else False)
    result = getattr(stages, STAGES[args.stage])(profile, paths, resume=resume, save_steps=args.save_steps)
    seconds = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")) == 0:
        spec = getattr(profile, SPEC_FIELD[args.stage])
        print(json.dumps({"stage": args.stage, "profile": profile.name, "processes": world_size(),
                          "global_batch": spec.batch_size * spec.grad_accum * world_size(),
                          "seconds": round(seconds, 1), "metrics": result.metrics}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
