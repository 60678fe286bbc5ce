"""A tiny run that misses its bar raises instead of printing a warning: the notebooks end each stage with
``helpers.bars.check``, so CI (which executes them) turns red when the course stops teaching.

Catches: a bar that is printed but never enforced ("TARGET NOT REACHED" and a green CI), a notebook that drops its
check, a comparison written the wrong way round, a per-type bar that only looks at the overall figure, and a
missed bar that hides the measured figure."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from helpers import bars
from helpers.config import FULL, TINY, Bars, Paths, StageSpec, with_settings
from helpers.course import run_notebook

ROOT = Path(__file__).resolve().parent.parent
GOOD = {
    "01_pretrain": {"initial_heldout_loss": 6.3, "final_heldout_loss": 0.2, "text_qa_accuracy": 1.0,
                    "text_qa_accuracy_by_type": {"colour": 1.0, "yes/no": 1.0}},
    "03_qlora_instruct": {"heldout_accuracy": 0.999, "heldout_accuracy_by_type": {"colour": 1.0, "count": 0.994},
                          "eos_rate": 1.0},
    "04_audio": {"typed_accuracy": 0.999, "spoken_accuracy": 0.987, "spoken_minus_typed_points": -1.2},
}


def test_the_documented_bars_pass_good_runs_and_name_what_a_bad_one_missed():
    for stage, metrics in GOOD.items():
        assert bars.misses(Bars(), stage, metrics) == []
    cases = [("01_pretrain", {"final_heldout_loss": 5.4}, "held-out loss 5.400 > target 5.300"),
             ("01_pretrain", {"text_qa_accuracy": 0.94}, "text probe 94.0% < 95%"),
             ("03_qlora_instruct", {"heldout_accuracy": 0.975}, "held-out accuracy 97.5% < 98%"),
             ("03_qlora_instruct", {"heldout_accuracy_by_type": {"colour": 1.0, "yes/no": 0.94}},
              "types below 95%: yes/no 94.0%"),
             ("03_qlora_instruct", {"eos_rate": 0.985}, "answers ending with EOS 98.5% < 99%"),
             ("04_audio", {"spoken_accuracy": 0.90, "spoken_minus_typed_points": -9.9},
              "spoken questions 9.9 points below typed ones")]
    for stage, change, words in cases:
        missed = bars.misses(Bars(), stage, {**GOOD[stage], **change})
        assert len(missed) == 1 and words in missed[0], (stage, change, missed)
    floor = f"{TINY.bars.heldout_accuracy:.0%}"  # the tiny profile enforces its floors (docs/binding.md)
    with pytest.raises(bars.BarNotMet, match=rf"03_qlora_instruct missed its bar: held-out accuracy 50.0% < {floor}"):
        bars.check(TINY, "03_qlora_instruct", {**GOOD["03_qlora_instruct"], "heldout_accuracy": 0.5})
    bars.check(FULL, "03_qlora_instruct", {})  # the full profile has no bars: it reports only
    assert with_settings(TINY, {"bars.text_probe": "0.5"}).bars.text_probe == 0.5


def test_binding_types_have_their_own_floor_and_every_other_type_keeps_its_bar():
    """A floor for the binding types (the tiny profile's two-kind world) must not lower the bar of the others.
    Catches: the floor applied to every type, or a binding type that escapes every bar."""
    floors = Bars(heldout_accuracy=0.5, binding_accuracy_by_type=0.4)
    metrics = {"heldout_accuracy": 0.9, "eos_rate": 1.0,
               "heldout_accuracy_by_type": {"colour": 0.94, "place": 0.45, "relation": 0.3, "follow-up": 0.99}}
    assert bars.misses(floors, "03_qlora_instruct", metrics) == ["types below 95%: colour 94.0%",
                                                                  "types below 40%: relation 30.0%"]
    assert bars.misses(Bars(heldout_accuracy=0.5), "03_qlora_instruct", metrics) == \
        ["types below 95%: colour 94.0%, place 45.0%, relation 30.0%"]
    assert TINY.bars.binding_accuracy_by_type is None or \
        TINY.bars.binding_accuracy_by_type <= TINY.bars.heldout_accuracy_by_type


def test_a_stage_that_cannot_meet_its_bar_raises_with_the_measured_figure(profile, tmp_path):
    """Notebook 01 for real, up to its evaluation (40 steps on the tests' small world), with a loss bar no run can
    reach."""
    impossible = dataclasses.replace(profile, bars=Bars(loss_drop=100.0),
                                     pretrain=StageSpec(learning_rate=3e-3, batch_size=16, max_steps=40,
                                                        logging_steps=10))
    paths = Paths(impossible, tmp_path)
    m = run_notebook("01_pretrain_phi", stop_after="evaluate", PROFILE=impossible, OUTPUT_DIR=tmp_path,
                     RESUME=False)["m"]
    assert m["final_heldout_loss"] < m["initial_heldout_loss"] - 1.0  # it learned, just not 100 nats
    with pytest.raises(bars.BarNotMet, match=rf"held-out loss {m['final_heldout_loss']:.3f} > target"):
        bars.check(impossible, "01_pretrain", m)
    assert json.loads((paths.metrics / "01_pretrain.json").read_text())["steps"] == 40  # figures kept for a look


@pytest.mark.parametrize("notebook, stage", [("01_pretrain_phi.ipynb", "01_pretrain"),
                                             ("03_qlora_instruct.ipynb", "03_qlora_instruct"),
                                             ("04_audio_pipeline.ipynb", "04_audio")])
def test_each_notebook_enforces_its_stage_bar(notebook, stage):
    cells = json.loads((ROOT / notebook).read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert any(f'bars.check(profile, "{stage}", m)' in c for c in code), f"{notebook} never checks its bar"
