"""Run the course's notebooks in order (the main job): ``python -m helpers.course [--profile tiny]``.

Each notebook is executed with nbclient in a fresh ``python3`` kernel; the executed copy (with its plots) is
saved under ``<output>/notebooks`` and the wall time of each under ``<output>/<profile>/metrics/run_times.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .config import default_profile_name

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ["01_pretrain_phi", "02_projection", "03_qlora_instruct", "04_audio_pipeline", "05_demo"]


def run(names, profile: str, output: Path, timeout: int = 3600) -> dict:
    import nbformat
    from nbclient import NotebookClient

    os.environ["MMPHI_PROFILE"] = profile
    os.environ["MMPHI_OUTPUT_DIR"] = str(output)
    (output / "notebooks").mkdir(parents=True, exist_ok=True)
    times = {}
    for name in names:
        source = ROOT / f"{name}.ipynb"
        if not source.exists():
            print(f"skip {name}: no such notebook")
            continue
        book = nbformat.read(source, as_version=4)
        start = time.perf_counter()
        print(f"running {name} ...", flush=True)
        client = NotebookClient(book, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT)}})
        try:
            client.execute()
        finally:
            nbformat.write(book, output / "notebooks" / f"{name}.ipynb")
        times[name] = round(time.perf_counter() - start, 1)
        print(f"  {name}: {times[name]:.0f}s -> {output / 'notebooks' / (name + '.ipynb')}", flush=True)
    metrics = output / profile / "metrics"
    metrics.mkdir(parents=True, exist_ok=True)
    (metrics / "run_times.json").write_text(json.dumps(times, indent=2))
    print(f"total {sum(times.values()):.0f}s")
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default=None, help="tiny or full (default: $MMPHI_PROFILE, else tiny)")
    parser.add_argument("--output", default=os.environ.get("MMPHI_OUTPUT_DIR", str(ROOT / "outputs")))
    parser.add_argument("--notebooks", nargs="*", default=NOTEBOOKS, help="which notebooks, in order")
    args = parser.parse_args(argv)
    names = [n for n in NOTEBOOKS if any(n.startswith(a) for a in args.notebooks)]
    try:
        run(names, args.profile or default_profile_name(), Path(args.output).resolve())
    except Exception as exc:  # nbclient's CellExecutionError carries the failing cell and traceback
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
