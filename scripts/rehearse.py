"""The dress rehearsal: notebooks 01-05 in the full profile, unchanged, offline, against stand-ins of every source.

    python scripts/rehearse.py                      # small stand-ins, CPU: sources as local paths, then as Hub ids
    python scripts/rehearse.py --size real          # real shapes (a GPU)
    python scripts/rehearse.py --spelling hub --notebooks 01 02

The stand-ins (``scripts/make_standins.py``) hold every source in its real format with random weights. Only two
things differ from a run in Colab: where the sources live (``MMPHI_PHI2`` ... set to the stand-ins' local folders,
or to Hub ids resolved from the stand-ins' Hugging Face cache with ``HF_HUB_OFFLINE=1``) and how many steps run
(ordinary settings from ``configs/rehearsal/<size>.settings``, passed as ``MMPHI_SETTINGS``). Each spelling runs in
a fresh output folder ``outputs/rehearsal/<size>-<spelling>``; a summary of what every notebook wrote (times,
losses, GPU peak memory, seconds per step) is printed and saved as ``outputs/rehearsal/<size>-summary.json``.
What it proves and what it cannot: README, "Before you rent a GPU".
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE_FILES = ["01_pretrain", "02_projection", "03_qlora_instruct", "04_audio", "05_demo"]
SUMMARY_KEYS = ["seconds", "initial_heldout_loss", "final_heldout_loss", "phi2_heldout_loss",
                "initial_heldout_caption_loss", "final_heldout_caption_loss", "steps", "seconds_per_step",
                "gpu_peak_allocated_gib", "freeform_judged_correct", "pope", "mmstar", "mmstar_blind", "typed_accuracy",
                "spoken_accuracy", "wer", "n_questions", "pope_blind", "pope_heldout_removed"]


def read_settings(size: str) -> str:
    """configs/rehearsal/<size>.settings (key=value per line, # comments) as an MMPHI_SETTINGS string."""
    lines = (ROOT / "configs" / "rehearsal" / f"{size}.settings").read_text().splitlines()
    return ",".join(line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip())


def standins(size: str, out: Path) -> dict:
    manifest = out / "standins.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_standins.py"), "--size", size, "--out", str(out)],
                   check=True)
    return json.loads(manifest.read_text())


def rehearsal_env(manifest: dict, spelling: str, size: str, out: Path, output: Path) -> dict:
    env = dict(os.environ)
    for key in [k for k in env if k.startswith("MMPHI_")]:
        del env[key]  # nothing from the caller's environment decides what the rehearsal reads
    env.update(manifest[f"settings_{spelling}"])
    env.update(MMPHI_PROFILE="full", MMPHI_OUTPUT_DIR=str(output), MMPHI_SETTINGS=read_settings(size),
               HF_HUB_CACHE=str(out / "hub"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    return env


def collect(output: Path) -> dict:
    metrics = output / "full" / "metrics"
    out = {"run_times": json.loads((metrics / "run_times.json").read_text())
           if (metrics / "run_times.json").exists() else {}}
    for stage in STAGE_FILES:
        path = metrics / f"{stage}.json"
        if path.exists():
            data = json.loads(path.read_text())
            out[stage] = {k: data[k] for k in SUMMARY_KEYS if k in data}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="small", choices=["small", "real"])
    parser.add_argument("--spelling", default="both", choices=["local", "hub", "both"])
    parser.add_argument("--notebooks", nargs="*", default=None, help="which notebooks (prefixes), default all")
    parser.add_argument("--standins", default=None, help="stand-in folder (default: standins/<size>)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the output folder of an earlier rehearsal (to rerun some notebooks)")
    args = parser.parse_args(argv)

    out = Path(args.standins or ROOT / "standins" / args.size).resolve()
    manifest = standins(args.size, out)
    spellings = ["local", "hub"] if args.spelling == "both" else [args.spelling]
    summary, failed = {}, []
    for spelling in spellings:
        output = ROOT / "outputs" / "rehearsal" / f"{args.size}-{spelling}"
        if not args.keep:
            shutil.rmtree(output, ignore_errors=True)  # a real first run, nothing reused
        env = rehearsal_env(manifest, spelling, args.size, out, output)
        print(f"\n=== rehearsal ({args.size} stand-ins, sources as {spelling} "
              f"{'paths' if spelling == 'local' else 'Hub ids'}) -> {output}", flush=True)
        command = [sys.executable, "-m", "helpers.course", "--profile", "full", "--output", str(output)]
        if args.notebooks:
            command += ["--notebooks", *args.notebooks]
        start = time.perf_counter()
        code = subprocess.run(command, cwd=ROOT, env=env).returncode
        summary[spelling] = {"exit_code": code, "seconds": round(time.perf_counter() - start, 1), **collect(output)}
        if code:
            failed.append(spelling)
    path = ROOT / "outputs" / "rehearsal" / f"{args.size}-summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    if failed:
        print(f"REHEARSAL FAILED ({', '.join(failed)}): see the executed notebooks under outputs/rehearsal/",
              file=sys.stderr)
        return 1
    print(f"rehearsal passed ({', '.join(spellings)}); summary -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
