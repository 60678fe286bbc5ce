"""The package a learner installs reads like its architecture: no import cycle, no import of the package's own
modules hidden inside a function, the rehearsal's tooling outside it, and reading a profile never looks at the GPU."""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

from helpers import time_plan
from helpers.config import FULL, get_profile

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "helpers"


def own_imports() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the package's modules it imports (anywhere), and the imports that sit inside a function."""
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph, inside = defaultdict(set), []
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("helpers")):
                base = (node.module or "").removeprefix("helpers").lstrip(".")
                targets = {base.split(".")[0]} if base else {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                targets = {a.name.split(".")[1] for a in node.names if a.name.startswith("helpers.")}
            else:
                continue
            targets &= modules
            graph[path.stem] |= targets
            if targets and id(node) not in top:
                inside.append(f"{path.name}:{node.lineno}")
    return graph, inside


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycle_and_no_import_hidden_in_a_function():
    graph, inside = own_imports()
    assert graph["stages"] >= {"config", "course", "time_plan"}  # the scan sees imports (it can fail)
    assert not cycles(graph), cycles(graph)
    assert not inside, f"imports of helpers' own modules inside functions: {inside}"


def test_the_cycle_check_finds_a_planted_cycle():
    graph, _ = own_imports()
    graph["config"] = graph["config"] | {"time_plan"}  # the circle issue 19 removed
    assert any({"config", "time_plan"} <= set(c) for c in cycles(graph))


def test_rehearsal_tooling_is_not_in_the_installed_package():
    assert not (PACKAGE / "standins.py").exists() and (ROOT / "rehearsal" / "standins.py").is_file()
    code = "import sys, helpers.stages, helpers.demo; print(sorted(m for m in sys.modules if m.startswith('rehearsal')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]"), out


def test_reading_a_profile_never_looks_at_the_gpu(monkeypatch):
    def no_gpu_questions(*args, **kwargs):
        raise AssertionError("get_profile asked about the GPU")

    monkeypatch.setattr(torch.cuda, "is_available", no_gpu_questions)
    monkeypatch.setattr(time_plan, "detect_gpu", no_gpu_questions)
    assert get_profile("full") == FULL
    assert get_profile("full", {"instruct.max_steps": 3}).pinned == {"instruct.max_steps"}
