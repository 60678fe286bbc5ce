"""The package a learner installs reads like its architecture: no import cycle, no import of the package's own
modules hidden inside a function, the rehearsal's tooling outside it, and reading a profile never looks at the GPU."""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

from helpers.config import FULL, get_profile
from helpers.planning import time_plan

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "helpers"


def module_names() -> dict[str, Path]:
    """Every module of the package by its dotted name under ``helpers`` (``data.world``; a room's ``__init__`` is the
    room itself, ``data``)."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def own_imports() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the package's modules it imports (anywhere), and the imports that sit inside a function."""
    modules = module_names()
    graph, inside = defaultdict(set), []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:  # relative: from its package upwards
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)]
                found = ".".join(base + ([node.module] if node.module else []))
                targets = {found} | {f"{found}.{a.name}".strip(".") for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "helpers":
                found = (node.module or "").removeprefix("helpers").lstrip(".")
                targets = {found} | {f"{found}.{a.name}".strip(".") for a in node.names}
            elif isinstance(node, ast.Import):
                targets = {a.name.removeprefix("helpers.") for a in node.names if a.name.startswith("helpers.")}
            else:
                continue
            targets = (targets & set(modules)) - {"", name}
            graph[name] |= targets
            if targets and id(node) not in top:
                inside.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
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
    assert graph["stages"] >= {"config", "course", "planning.time_plan", "views"}  # the scan sees imports (it can fail)
    assert not cycles(graph), cycles(graph)
    assert not inside, f"imports of helpers' own modules inside functions: {inside}"


def test_the_cycle_check_finds_a_planted_cycle():
    graph, _ = own_imports()
    graph["config"] = graph["config"] | {"planning.time_plan"}  # the circle issue 19 removed
    assert any({"config", "planning.time_plan"} <= set(c) for c in cycles(graph))


ROOMS = {"data", "models", "train", "scoring", "planning", "views"}
TOP_LEVEL = {"config", "course", "stages", "bars", "notebook_setup", "requirements_check", "demo"}


def test_the_package_is_a_few_rooms_and_the_notebooks_front_door():
    """Every module sits in a room (a subpackage with a docstring saying what it holds) but the few a notebook opens
    with; a room imports no module of the front door but ``config`` (the rooms are what the front door is built
    from), and the front door's runner (``course``) imports no room. Catches a module dropped at the top, a room
    without its docstring, and an import running back up."""
    names = module_names()
    rooms = {n for n in names if n and "." not in n and names[n].name == "__init__.py"}
    assert rooms == ROOMS, rooms
    assert {n for n in names if n and "." not in n and n not in rooms} == TOP_LEVEL, sorted(names)
    for room in rooms:
        assert ast.get_docstring(ast.parse(names[room].read_text())), f"helpers/{room}/__init__.py says nothing"
    graph, _ = own_imports()
    up = {(a, b) for a, targets in graph.items() if "." in a for b in targets if b in TOP_LEVEL - {"config"}}
    assert not up, f"rooms importing the front door: {sorted(up)}"
    assert not graph["course"] & (ROOMS | {t for t in graph["course"] if "." in t}), graph["course"]


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


def test_the_installed_package_holds_every_room():
    """pyproject's package list, as setuptools reads it, takes every room into the wheel (``packages = ["helpers"]``
    alone would ship the front door without its rooms)."""
    import tomllib

    from setuptools import find_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = set(find_packages(str(ROOT), include=find["include"], exclude=find.get("exclude", ())))
    assert shipped == {"helpers"} | {f"helpers.{room}" for room in ROOMS}, shipped
