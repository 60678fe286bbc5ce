"""benchmarks/seeds.py: docs/seeds.md's seeds table is generated from the committed results file, and the bars are
applied as the issue states them."""
import importlib.util
import json
from pathlib import Path

from helpers.requirements_check import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent


def _seeds_module():
    spec = importlib.util.spec_from_file_location("seeds_benchmark", ROOT / "benchmarks" / "seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(seed=0, world_seed=0, heldout=1.0, by_type=None, eos=1.0, probe=1.0):
    return {"seed": seed, "world_seed": world_seed, "probe_accuracy": probe, "heldout_accuracy": heldout,
            "heldout_accuracy_by_type": by_type or {"colour": 1.0, "yes/no": 1.0}, "eos_rate": eos,
            "seconds_by_notebook": {"01_pretrain_phi": 200.0, "02_projection": 40.0, "03_qlora_instruct": 150.0}}


def test_bars_are_applied_to_every_part():
    seeds = _seeds_module()
    assert seeds.meets_bars(_run())["all"]
    assert not seeds.meets_bars(_run(heldout=0.97))["all"]
    assert not seeds.meets_bars(_run(by_type={"colour": 1.0, "yes/no": 0.94}))["every_type"]
    assert not seeds.meets_bars(_run(eos=0.985))["all"]
    assert not seeds.meets_bars(_run(probe=0.94))["all"]


def test_table_has_a_row_per_run_and_a_column_per_type():
    seeds = _seeds_module()
    data = {"machine": {"cpu": "Some CPU", "cores": 2, "torch": "2.x", "gpu": None, "parallel_runs": 2,
                        "threads_per_run": 1},
            "runs": [_run(1, 0), _run(0, 1, by_type={"colour": 0.9, "yes/no": 1.0})]}
    table = seeds.render_table(data)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 3  # header + 2 runs, sorted by world then seed
    assert "colour %" in rows[0] and "yes/no %" in rows[0]
    assert rows[1].startswith("| 0 | 1 |") and rows[2].startswith("| 1 | 0 |")
    assert "**no**" in rows[2] and "| yes |" in rows[1]
    assert "Some CPU, 2 cores" in table


def test_seeds_doc_table_is_the_committed_results():
    seeds = _seeds_module()
    files = seeds.result_files()
    if not files:
        skip_or_fail("no committed results yet in benchmarks/results (python benchmarks/seeds.py)")
    doc = (ROOT / "docs" / "seeds.md").read_text()
    assert seeds.table_block(files) in doc, \
        "docs/seeds.md's table differs from benchmarks/results: run python benchmarks/seeds.py --update-doc"
    for path in files:
        data = json.loads(path.read_text())
        assert data["runs"] and all("heldout_accuracy_by_type" in r for r in data["runs"])
