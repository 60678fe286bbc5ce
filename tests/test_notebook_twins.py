"""Stage 03 is written once, in notebook 03's cells: the notebook shows the library calls a learner would write, and
the script, the seeds benchmark and the tests run those very cells (``helpers.course``), so they cannot diverge."""
from __future__ import annotations

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _code(notebook: str) -> list[str]:
    cells = json.loads((ROOT / notebook).read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def test_notebook_03_walks_through_its_stage_in_library_calls():
    code = "\n".join(_code("03_qlora_instruct.ipynb"))
    for call in ("BitsAndBytesConfig(", "prepare_model_for_kbit_training(", "LoraConfig(", "get_peft_model(",
                 "CachedFeatureTrainer(", "training_arguments(", "train(trainer", "export_merged("):
        assert call in code, f"notebook 03 does not show {call}"
    assert "instruct_stage" not in code


def _calls(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return names


def test_no_second_copy_of_stage_03_outside_its_notebook():
    """Nothing but the notebook builds stage 03's 4-bit model, adapters or trainer. The memory planner models the
    layout on the meta device (checked against the notebook's cells in test_memory_plan); the tests' own trainer
    (conftest.train_qlora) exercises the trainer's mechanics with switches the notebook does not have."""
    allowed = {ROOT / "helpers" / "memory_plan.py", ROOT / "tests" / "conftest.py"}
    offenders = []
    for folder in ("helpers", "scripts", "benchmarks", "tests", "rehearsal"):
        for path in (ROOT / folder).rglob("*.py"):
            if path in allowed:
                continue
            found = _calls(path) & {"BitsAndBytesConfig", "get_peft_model", "LoraConfig", "train_instruct"}
            if found:
                offenders.append(f"{path.relative_to(ROOT)}: {sorted(found)}")
    assert not offenders, offenders


def test_script_and_benchmark_run_notebook_03_itself():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_stage", ROOT / "scripts" / "train_stage.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.STAGES["instruct"] == "03_qlora_instruct"
    seeds = (ROOT / "benchmarks" / "seeds.py").read_text()
    assert 'run_notebook("03_qlora_instruct"' in seeds
    tags = [set(c.get("metadata", {}).get("tags", [])) for c in json.loads(
        (ROOT / "03_qlora_instruct.ipynb").read_text())["cells"]]
    for tag in ("setup", "parameters", "load-4bit", "features", "lora", "trainer", "train", "evaluate"):
        assert sum(tag in t for t in tags) == 1, f"notebook 03 needs exactly one cell tagged {tag!r}"


def test_run_notebook_rejects_a_parameter_or_stop_the_notebook_does_not_have(tmp_path):
    import pytest

    from helpers.course import NotebookError, run_cells, run_notebook

    with pytest.raises(NotebookError, match="no cell tagged 'nowhere'"):
        run_notebook("03_qlora_instruct", stop_after="nowhere")
    with pytest.raises(NotebookError, match="no parameter"):
        run_notebook("03_qlora_instruct", stop_after="parameters", LEARNING_RATE=1.0)
    with pytest.raises(NotebookError, match="0 cells tagged 'nowhere'"):
        run_cells("03_qlora_instruct", ["nowhere"])
    done = run_notebook("03_qlora_instruct", stop_after="parameters", RESUME=False, OUTPUT_DIR=str(tmp_path))
    assert done["RESUME"] is False and done["OUTPUT_DIR"] == str(tmp_path) and "profile" not in done
