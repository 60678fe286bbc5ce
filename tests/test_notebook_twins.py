"""Each stage is written once, in its notebook's cells: the notebook shows the library calls a learner would write,
and the script, the seeds benchmark, a later notebook that needs the stage and the tests run those very cells
(``helpers.course``), so they cannot diverge."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _code(notebook: str) -> list[str]:
    cells = json.loads((ROOT / notebook).read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


LESSON_CALLS = {
    "01_pretrain_phi": ("pack_documents(", "PhiConfig(", "PhiForCausalLM(config)", "training_arguments(",
                        "CourseTrainer(", "train(trainer", "save_pretrained("),
    "02_projection": ("PhiForCausalLM.from_pretrained(", "assemble_llava(", "model.requires_grad_(False)",
                      "multi_modal_projector.requires_grad_(True)", "feature_table(", "training_arguments(",
                      "CachedFeatureTrainer(", "train(trainer", "save_pretrained("),
    "03_qlora_instruct": ("BitsAndBytesConfig(", "prepare_model_for_kbit_training(", "LoraConfig(",
                          "get_peft_model(", "CachedFeatureTrainer(", "training_arguments(", "train(trainer",
                          "export_merged("),
}
STEP_TAGS = {
    "01_pretrain_phi": ("setup", "parameters", "data", "tokenizer", "blocks", "model", "trainer", "train", "evaluate"),
    "02_projection": ("setup", "parameters", "data", "vision-tower", "llava", "freeze", "features", "trainer", "train",
                      "evaluate"),
    "03_qlora_instruct": ("setup", "parameters", "data", "load-4bit", "features", "lora", "trainer", "train", "export",
                          "evaluate"),
}


@pytest.mark.parametrize("notebook", sorted(LESSON_CALLS))
def test_each_training_notebook_walks_through_its_stage_in_library_calls(notebook):
    code = "\n".join(_code(f"{notebook}.ipynb"))
    for call in LESSON_CALLS[notebook]:
        assert call in code, f"{notebook} does not show {call}"
    assert "_stage(" not in code  # no stage function hides the lesson
    tags = [set(c.get("metadata", {}).get("tags", [])) for c in json.loads(
        (ROOT / f"{notebook}.ipynb").read_text())["cells"]]
    for tag in STEP_TAGS[notebook]:
        assert sum(tag in t for t in tags) == 1, f"{notebook} needs exactly one cell tagged {tag!r}"


# 04 and 05 train nothing; their lesson is loading Whisper and turning a transcript into the user turn (04), and
# answering from the exported assistant with a streamed generate (05), in calls a learner would write
SPEECH_AND_DEMO_CALLS = {
    "04_audio_pipeline": ("WhisperModel(", "whisper.load_model(", "asr.transcribe(", "transcript_to_question(",
                          "chat.ask(q)", "prompt_for_next_answer("),
    "05_demo": ("load_assistant(", "prompt_for_next_answer(", "processor(images=", "TextIteratorStreamer(",
                "target=model.generate", "DemoBackend(model, processor", "build_app(backend)"),
}


@pytest.mark.parametrize("notebook", sorted(SPEECH_AND_DEMO_CALLS))
def test_speech_and_demo_notebooks_show_their_library_calls(notebook):
    code = "\n".join(_code(f"{notebook}.ipynb"))
    for call in SPEECH_AND_DEMO_CALLS[notebook]:
        assert call in code, f"{notebook} does not show {call}"
    assert "ask_spoken(" not in code and "DemoBackend.from_profile(" not in code  # no helper hides the lesson


def _parse(source: str) -> ast.Module:
    return ast.parse("\n".join(line for line in source.splitlines() if not line.startswith("%")))  # no magics


def _free_names(source: str) -> set[str]:
    """Names a cell reads without binding them itself (builtins aside)."""
    import builtins

    tree = _parse(source)
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
            and n.id not in bound and not hasattr(builtins, n.id)}


@pytest.mark.parametrize("notebook", sorted(STEP_TAGS))
def test_a_named_cell_imports_what_it_uses(notebook):
    """``run_cells`` runs a named cell on the variables it is given: a module or function it only finds because an
    earlier cell imported it works in Jupyter and fails there (seen: ``reporting`` and ``time`` in the train and
    evaluate cells). Catches a named cell that reads a name another cell imported."""
    cells = json.loads((ROOT / f"{notebook}.ipynb").read_text())["cells"]
    code = [("".join(c["source"]), set(c.get("metadata", {}).get("tags", []))) for c in cells
            if c["cell_type"] == "code"]
    imported = set()
    for source, _ in code:
        for node in ast.walk(_parse(source)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
    for source, tags in code:
        if tags - {"setup", "parameters"}:
            leaked = _free_names(source) & imported
            assert not leaked, f"{notebook} cell {sorted(tags)} uses {sorted(leaked)} without importing them"


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
    allowed = {ROOT / "helpers" / "planning" / "memory_plan.py", ROOT / "tests" / "conftest.py"}
    offenders = []
    for folder in ("helpers", "scripts", "benchmarks", "tests", "rehearsal"):
        for path in (ROOT / folder).rglob("*.py"):
            if path in allowed:
                continue
            found = _calls(path) & {"BitsAndBytesConfig", "get_peft_model", "LoraConfig", "train_instruct"}
            if found:
                offenders.append(f"{path.relative_to(ROOT)}: {sorted(found)}")
    assert not offenders, offenders


def test_script_benchmark_and_missing_stages_run_the_notebooks_themselves():
    import importlib.util

    from helpers import stages

    spec = importlib.util.spec_from_file_location("train_stage", ROOT / "scripts" / "train_stage.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.STAGES == {"pretrain": "01_pretrain_phi", "projection": "02_projection",
                             "instruct": "03_qlora_instruct"}
    seeds = (ROOT / "benchmarks" / "seeds.py").read_text()
    for notebook in ("01_pretrain_phi", "02_projection", "03_qlora_instruct"):
        assert f'run_notebook("{notebook}"' in seeds
    stage_functions = [name for name in dir(stages) if name.endswith("_stage")]
    assert stage_functions == [], f"a second copy of a stage: helpers.stages.{stage_functions}"


def test_notebook_01s_phi_config_is_the_one_the_planners_and_tests_build(tok, profile):
    """The memory and time planners and the tests build Phi LMs with ``helpers.models.modeling.phi_config``; notebook 01
    writes its ``PhiConfig(...)`` out for the learner. Catches the two drifting apart (a size or token id the
    planners would not model)."""
    from helpers.course import run_cells
    from helpers.models.modeling import phi_config
    from helpers.train.pretrain import pack_documents

    cells = run_cells("01_pretrain_phi", ["model"], profile=profile, tok=tok,
                      heldout=pack_documents(tok, ["a red circle at top left."] * 4, 16))
    ours, planners = cells["config"].to_dict(), phi_config(profile.pretrain_phi, tok).to_dict()
    ours.pop("transformers_version", None), planners.pop("transformers_version", None)
    assert ours == planners


def test_run_notebook_rejects_a_parameter_or_stop_the_notebook_does_not_have(tmp_path):
    from helpers.course import NotebookError, run_cells, run_notebook

    with pytest.raises(NotebookError, match="no cell tagged 'nowhere'"):
        run_notebook("03_qlora_instruct", stop_after="nowhere")
    with pytest.raises(NotebookError, match="no parameter"):
        run_notebook("03_qlora_instruct", stop_after="parameters", LEARNING_RATE=1.0)
    with pytest.raises(NotebookError, match="0 cells tagged 'nowhere'"):
        run_cells("03_qlora_instruct", ["nowhere"])
    done = run_notebook("03_qlora_instruct", stop_after="parameters", RESUME=False, OUTPUT_DIR=str(tmp_path))
    assert done["RESUME"] is False and done["OUTPUT_DIR"] == str(tmp_path) and "profile" not in done
