"""The bars of a tiny run (``helpers.config.Bars``), enforced: each notebook ends its stage with
:func:`check`, which prints what was reached and raises :class:`BarNotMet` with the measured figures when a bar is
missed. A model that did not learn must show it, and CI (which executes the notebooks) then fails."""
from __future__ import annotations

from helpers.data.world import BINDING_TYPES


class BarNotMet(RuntimeError):
    """A stage finished but did not reach its bar (the metrics are written before this is raised)."""


def misses(bars, stage: str, metrics: dict) -> list[str]:
    """What `metrics` of `stage` ("01_pretrain", "03_qlora_instruct", "04_audio") miss of `bars`, in words."""
    out = []
    if stage == "01_pretrain":
        target = metrics["initial_heldout_loss"] - bars.loss_drop
        if not metrics["final_heldout_loss"] <= target:
            out.append(f"held-out loss {metrics['final_heldout_loss']:.3f} > target {target:.3f} "
                       f"(initial {metrics['initial_heldout_loss']:.3f} - {bars.loss_drop})")
        if "text_qa_accuracy" in metrics and not metrics["text_qa_accuracy"] >= bars.text_probe:
            out.append(f"text probe {metrics['text_qa_accuracy']:.1%} < {bars.text_probe:.0%} "
                       f"(by type: {_percent(metrics['text_qa_accuracy_by_type'])})")
    elif stage == "03_qlora_instruct":
        if not metrics["heldout_accuracy"] >= bars.heldout_accuracy:
            out.append(f"held-out accuracy {metrics['heldout_accuracy']:.1%} < {bars.heldout_accuracy:.0%}")
        for bar, low in _low_types(bars, metrics["heldout_accuracy_by_type"]).items():
            out.append(f"types below {bar:.0%}: {_percent(low)}")
        if not metrics["eos_rate"] >= bars.eos_rate:
            out.append(f"answers ending with EOS {metrics['eos_rate']:.1%} < {bars.eos_rate:.0%}")
    elif stage == "04_audio":
        gap = -metrics["spoken_minus_typed_points"]
        if not gap <= bars.spoken_gap_points:
            out.append(f"spoken questions {gap:.1f} points below typed ones (typed {metrics['typed_accuracy']:.1%}, "
                       f"spoken {metrics['spoken_accuracy']:.1%}) > {bars.spoken_gap_points} points")
    else:
        raise ValueError(f"no bars for stage {stage!r}")
    return out


def check(profile, stage: str, metrics: dict) -> None:
    """Raise :class:`BarNotMet` when `stage` missed a bar of ``profile.bars``; print that it met them otherwise.
    A profile without bars (full) only says so."""
    if profile.bars is None:
        print(f"{stage}: the {profile.name} profile sets no bars; judge the figures above yourself")
        return
    missed = misses(profile.bars, stage, metrics)
    if missed:
        raise BarNotMet(f"{stage} missed its bar: " + "; ".join(missed)
                        + ". The model did not learn what the next notebooks rely on (README: Seeds and worlds).")
    print(f"{stage}: every bar met")


def _low_types(bars, by_type: dict) -> dict[float, dict]:
    """{bar: {type: accuracy}} of the types below their bar (binding types: ``binding_accuracy_by_type`` when set)."""
    out: dict[float, dict] = {}
    for qtype, accuracy in by_type.items():
        bar = bars.heldout_accuracy_by_type
        if qtype in BINDING_TYPES and bars.binding_accuracy_by_type is not None:
            bar = bars.binding_accuracy_by_type
        if not accuracy >= bar:
            out.setdefault(bar, {})[qtype] = accuracy
    return out


def _percent(by_type: dict) -> str:
    return ", ".join(f"{t} {a:.1%}" for t, a in by_type.items())
