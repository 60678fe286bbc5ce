"""Run the course's notebooks: the main job, and every other place a stage runs.

* ``python -m helpers.course [--profile tiny]`` executes the notebooks in order with nbclient, each in a fresh
  ``python3`` kernel; the executed copy (with its plots) is saved under ``<output>/notebooks`` and the wall time of
  each under ``<output>/<profile>/metrics/run_times.json``.
* :func:`run_notebook` executes one notebook's code cells in *this* process, with parameters, as papermill would
  (the cell tagged ``parameters`` is followed by the given values): ``scripts/train_stage.py``,
  ``benchmarks/seeds.py``, the tests and a later notebook that needs an earlier stage's output (``helpers.stages``)
  run a stage this way, so its sequence is written once, in its notebook.
* :func:`run_cells` executes named cells only (a cell is named by its tag), on given inputs: the tests and
  benchmarks build the course's models and trainers with the notebooks' own cells.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from helpers.config import default_profile_name

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ["01_pretrain_phi", "02_projection", "03_qlora_instruct", "04_audio_pipeline", "05_demo"]


class NotebookError(RuntimeError):
    """A notebook (or one of its named cells) cannot be run from here."""


def notebook_path(name: str) -> Path:
    """The file of notebook `name` (``03_qlora_instruct`` or its file name) in this checkout."""
    return ROOT / (name if name.endswith(".ipynb") else f"{name}.ipynb")


def code_cells(name: str) -> list[tuple[set, str]]:
    """(tags, source) of each code cell of notebook `name` (``03_qlora_instruct`` or its file name)."""
    import nbformat

    path = notebook_path(name)
    if not path.exists():
        raise NotebookError(f"{path.name} is not here (looked in {ROOT}): the course's notebooks are in its Git "
                            "repository; open this notebook from a clone of the whole course.")
    book = nbformat.read(path, as_version=4)
    return [(set(c.metadata.get("tags", [])), c.source) for c in book.cells if c.cell_type == "code"]


def _execute(name: str, index: int, source: str, namespace: dict) -> None:
    exec(compile(source, f"<{name} cell {index}>", "exec"), namespace)


def _namespace(**values) -> dict:
    from IPython.display import display

    if "ipykernel" not in sys.modules:  # outside Jupyter, plots are written to files only
        import matplotlib

        matplotlib.use("Agg")
    return {"__name__": "__main__", "display": display, **values}


def run_notebook(name: str, /, stop_after: str | None = None, **parameters) -> dict:
    """Execute notebook `name`'s code cells in this process and return its variables.

    The setup cell (tag ``setup``: installs what is missing) is skipped, since this process already runs the
    course; right after the cell tagged ``parameters``, `parameters` (``PROFILE``, ``OUTPUT_DIR``, ``SETTINGS``,
    ``RESUME``, ``SAVE_STEPS``) replace its values. ``PROFILE`` may be a Profile object, used as it is.
    `stop_after`: the tag of the last cell to run (e.g. ``"train"``)."""
    cells = code_cells(name)
    if stop_after is not None and not any(stop_after in tags for tags, _ in cells):
        raise NotebookError(f"{name} has no cell tagged {stop_after!r}")
    namespace = _namespace()
    for index, (tags, source) in enumerate(cells):
        if "setup" in tags:
            continue
        _execute(name, index, source, namespace)
        if "parameters" in tags:
            unknown = set(parameters) - set(namespace)
            if unknown:
                raise NotebookError(f"{name} has no parameter {sorted(unknown)}")
            namespace.update(parameters)
        if stop_after in tags:
            break
    return namespace


def run_cells(name: str, tags: list[str], /, **inputs) -> dict:
    """Execute only the cells of notebook `name` tagged with `tags`, in that order, on `inputs` (the variables those
    cells read); returns the variables afterwards. Each named cell imports what it uses."""
    cells = code_cells(name)
    namespace = _namespace(**inputs)
    for tag in tags:
        found = [(i, source) for i, (cell_tags, source) in enumerate(cells) if tag in cell_tags]
        if len(found) != 1:
            raise NotebookError(f"{name} has {len(found)} cells tagged {tag!r}, not one")
        _execute(name, found[0][0], found[0][1], namespace)
    return namespace


def run(names, profile: str, output: Path, timeout: int = 3600) -> dict:
    import nbformat
    from nbclient import NotebookClient

    os.environ["MMPHI_PROFILE"] = profile
    os.environ["MMPHI_OUTPUT_DIR"] = str(output)
    (output / "notebooks").mkdir(parents=True, exist_ok=True)
    times = {}
    for name in names:
        source = notebook_path(name)
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
