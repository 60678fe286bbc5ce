"""End-to-end time of each notebook and stage of a course run, from the metrics the run wrote.

Reads ``<output>/<profile>/metrics/run_times.json`` (wall time per executed notebook, written by helpers.course)
and the per-stage metrics JSONs the notebooks write (``01_pretrain.json``, ``02_vision_tower.json``,
``02_projection.json``, ``03_qlora_instruct.json``: their ``seconds`` and finer timings), and prints one table.
It compares the notebook's wall time with the time of the stages it ran (the rest is kernel start-up, data
generation, plots and look-inside cells outside what a stage's metrics time).

    python benchmarks/notebook_times.py                      # outputs/tiny
    python benchmarks/notebook_times.py --profile full --output /path/to/outputs --json times.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import _common as C  # noqa: E402

# notebook -> the stage metrics files it writes (a notebook may also rerun a missing earlier stage)
NOTEBOOK_STAGES = {
    "01_pretrain_phi": ["01_pretrain"],
    "02_projection": ["02_vision_tower", "02_projection"],
    "03_qlora_instruct": ["03_qlora_instruct"],
    "04_audio_pipeline": [],
    "05_demo": [],
}
DETAIL_KEYS = {"02_vision_tower": ["train_seconds"], "02_projection": ["feature_cache_seconds"],
               "03_qlora_instruct": ["train_seconds"]}
HOW_TO = ("No metrics found under {metrics}.\nProduce them with a course run, e.g.\n"
          "    bash scripts/run_course.sh                       # every notebook, tiny profile (writes run_times.json)\n"
          "    .venv/bin/python -m helpers.course --profile tiny  # the same without the setup step\n"
          "or run a single stage (stage metrics only):\n"
          "    .venv/bin/python scripts/train_stage.py projection --profile tiny")


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect(metrics: Path) -> dict:
    run_times = read_json(metrics / "run_times.json") or {}
    stages = {}
    for name in sorted({s for v in NOTEBOOK_STAGES.values() for s in v}):
        data = read_json(metrics / f"{name}.json")
        if data is not None:
            stages[name] = data
    rows = []
    notebooks = list(NOTEBOOK_STAGES) + [n for n in run_times if n not in NOTEBOOK_STAGES]
    for nb in notebooks:
        stage_names = [s for s in NOTEBOOK_STAGES.get(nb, []) if s in stages]
        if nb not in run_times and not stage_names:
            continue
        stage_seconds = sum(float(stages[s].get("seconds", 0.0)) for s in stage_names) if stage_names else None
        wall = run_times.get(nb)
        rows.append({"notebook / stage": nb, "notebook_s": wall, "stages_s": stage_seconds,
                     "outside_stages_s": (wall - stage_seconds) if wall is not None and stage_seconds else None,
                     "written_at": None})
        for s in stage_names:
            rows.append({"notebook / stage": f"  {s}", "stages_s": float(stages[s].get("seconds", 0.0)),
                         "written_at": stages[s].get("written_at")})
            for key in DETAIL_KEYS.get(s, []):
                if key in stages[s]:
                    rows.append({"notebook / stage": f"    {key.replace('_seconds', '')}",
                                 "stages_s": float(stages[s][key])})
    total_wall = sum(run_times.values()) if run_times else None
    total_stages = sum(float(d.get("seconds", 0.0)) for d in stages.values()) if stages else None
    rows.append({"notebook / stage": "total", "notebook_s": total_wall, "stages_s": total_stages})
    for row in rows:  # each notebook's (or stage's) share of the whole run
        base, part = (total_wall, row.get("notebook_s")) if total_wall else (total_stages, row.get("stages_s"))
        if base and part is not None and (not row["notebook / stage"].startswith("  ") or not total_wall):
            row["share"] = f"{100 * part / base:.0f}%"
    return {"run_times": run_times, "stages": stages, "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--output", default=os.environ.get("MMPHI_OUTPUT_DIR", str(ROOT / "outputs")),
                        help="the course's output root (default: $MMPHI_OUTPUT_DIR or ./outputs)")
    parser.add_argument("--json", help="write the table as JSON here")
    args = parser.parse_args(argv)
    metrics = Path(args.output) / args.profile / "metrics"
    data = collect(metrics)
    if not data["run_times"] and not data["stages"]:
        print(HOW_TO.format(metrics=metrics))
        return 1
    print(f"Course run times, profile {args.profile} ({metrics})")
    if not data["run_times"]:
        print("(no run_times.json: notebook wall times appear after a full course run; stage times only)")
    print(C.table(data["rows"], ["notebook / stage", "notebook_s", "stages_s", "outside_stages_s", "share",
                                      "written_at"]))
    C.save_json(args.json, {"benchmark": "notebook_times", "profile": args.profile, "metrics_dir": str(metrics),
                            **data})
    return 0


if __name__ == "__main__":
    sys.exit(main())
