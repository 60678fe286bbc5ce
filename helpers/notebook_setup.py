"""What the first cell of every notebook runs: install what the notebook needs, with the tested versions.

``python helpers/notebook_setup.py REPO REF [--extras audio,demo] [--tools espeak-ng]`` (or ``python -m
helpers.notebook_setup ...`` once the course is installed). Standard library only: it runs *before* the course
and its dependencies are installed (a notebook opened alone in Colab or SageMaker fetches this file first).

* The course's Python packages: when ``mmphi`` (with the notebook's extras) is not fully installed, ``pip install
  -c constraints.txt`` either the checkout this file belongs to in editable mode (when the notebook runs inside
  it) or ``mmphi[extras] @ git+REPO@REF``. ``constraints.txt`` is the one beside this file, or else the one of
  REPO at REF. A PyTorch that is already installed (Colab's CUDA build) is kept: its pins are left out.
* System tools (espeak-ng for notebooks 04/05): ``apt-get install`` when missing and running as root, else a
  notice with the command.

It prints what it did, or that nothing was needed.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

DIST = "mmphi"
_SCRATCH: list[tempfile.TemporaryDirectory] = []  # fetched copies, filtered constraints: removed at exit
KEEP_INSTALLED = re.compile(r"^(torch|triton|nvidia-.*)$")  # the platform's PyTorch stack, if it has one


def scratch() -> Path:
    """A new temporary folder, removed when this script ends."""
    _SCRATCH.append(tempfile.TemporaryDirectory(prefix="mmphi-"))
    return Path(_SCRATCH[-1].name)


def checkout_root(start: str | os.PathLike = ".") -> Path | None:
    """The course checkout the notebook runs in: pyproject.toml in `start` or its parent (as the cells look)."""
    for folder in (Path(start).resolve(), Path(start).resolve().parent):
        if (folder / "pyproject.toml").is_file():
            return folder
    return None


def pip_url(repo: str) -> str:
    """A repository as pip's ``git+`` wants it: URLs as they are, local folders as ``file://localhost/`` URLs
    (pip's requirement parser refuses ``file:///`` URLs, which have no host)."""
    if "://" not in repo and not repo.startswith("git@"):
        repo = Path(repo).expanduser().resolve().as_uri()
    return "file://localhost/" + repo[len("file:///"):] if repo.startswith("file:///") else repo


def fetch_tree(repo: str, ref: str) -> Path:
    """A shallow copy of `repo` at `ref` (tag, branch or commit) in a temporary folder."""
    tree = scratch()
    for args in (["init", "-q"], ["fetch", "-q", "--depth=1", repo, ref], ["checkout", "-q", "FETCH_HEAD"]):
        subprocess.run(["git", "-C", str(tree), *args], check=True, env=dict(os.environ, GIT_TERMINAL_PROMPT="0"))
    return tree


def _requirement(text: str):
    try:
        from packaging.requirements import Requirement
    except ImportError:  # not installed yet: pip always carries a copy
        from pip._vendor.packaging.requirements import Requirement
    return Requirement(text)


def missing_packages(extras: list[str]) -> list[str]:
    """Requirements of the installed course (core + `extras`) whose distribution is not installed; ["mmphi"] when
    the course itself is not installed."""
    try:
        requires = metadata.requires(DIST) or []
    except metadata.PackageNotFoundError:
        return [DIST]
    if importlib.util.find_spec("helpers") is None:  # metadata without the package (e.g. a stale install)
        return [DIST]
    missing = []
    for text in requires:
        req = _requirement(text)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in [""] + extras):
            continue
        try:
            metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(req.name)
    return missing


def usable_constraints(path: Path) -> tuple[Path, list[str]]:
    """`path`, minus the pins of an already installed PyTorch stack (kept as it is); the names left out."""
    kept, out = [], []
    for line in path.read_text().splitlines():
        name = re.split(r"[=<>!~ ;\[#]", line.strip(), maxsplit=1)[0]
        if name and KEEP_INSTALLED.match(name.lower()) and _installed(name):
            out.append(f"{name} {_installed(name)}")
            continue
        kept.append(line)
    if not out:
        return path, []
    filtered = scratch() / "constraints.txt"
    filtered.write_text("\n".join(kept) + "\n")
    return filtered, out


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def install_course(repo: str, ref: str, extras: list[str], here: Path) -> str:
    """pip-install the course (+ extras) with the constraints; returns a line saying what was installed."""
    source = Path(__file__).resolve().parent.parent  # the checkout, a fetched copy, or site-packages
    spec = f"{DIST}[{','.join(extras)}]" if extras else DIST
    checkout = checkout_root(here)
    if checkout is not None and checkout == source:
        target, origin = ["-e", f"{checkout}[{','.join(extras)}]" if extras else str(checkout)], str(checkout)
    else:
        target, origin = [f"{spec} @ git+{pip_url(repo)}@{ref}"], f"{repo} at {ref}"
    constraints = source / "constraints.txt"
    if not constraints.is_file():  # the installed copy has none: take the one of the same repository and ref
        constraints = fetch_tree(repo, ref) / "constraints.txt"
    constraints, kept = usable_constraints(constraints)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", str(constraints), *target], check=True)
    line = f"installed {spec} {_installed(DIST)} from {origin} ({'editable, ' if target[0] == '-e' else ''}" \
           f"tested versions from constraints.txt)"
    return line + (f"; kept the installed {', '.join(kept)}" if kept else "")


def install_tools(tools: list[str]) -> tuple[list[str], list[str]]:
    """apt-get install the missing `tools` when running as root; (what was done, what is still missing)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return [], []
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        ok = subprocess.run(["apt-get", "update", "-qq"], env=env).returncode == 0 and subprocess.run(
            ["apt-get", "install", "-y", "-qq", *missing], env=env).returncode == 0
        if ok:
            return [f"installed {' '.join(missing)} with apt-get"], [t for t in missing if shutil.which(t) is None]
    return [], missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("repo", help="the course's Git repository (URL or local folder)")
    parser.add_argument("ref", help="tag, branch or commit to install from it")
    parser.add_argument("--extras", default="", help="pyproject extras this notebook needs, e.g. audio,demo")
    parser.add_argument("--tools", default="", help="system tools this notebook needs, e.g. espeak-ng")
    args = parser.parse_args(argv)
    extras = [e for e in args.extras.split(",") if e]
    tools = [t for t in args.tools.split(",") if t]
    done, missing = [], missing_packages(extras)
    if missing == [DIST] and (__package__ or checkout_root() is not None):
        # helpers is importable without being installed: `-m helpers.notebook_setup` from a path set up by hand, or
        # a notebook inside a checkout (its cell puts the checkout on sys.path) whose dependencies are all there
        print(f"Course setup: helpers comes from {Path(__file__).resolve().parent} (not installed as {DIST}); "
              "its dependencies are all installed: nothing to install.")
        missing = []
    if missing:
        print(f"Course setup: missing {', '.join(missing)}; installing ...", flush=True)
        try:
            done.append(install_course(args.repo, args.ref, extras, Path.cwd()))
        except subprocess.CalledProcessError:
            if missing == [DIST]:
                raise
            # the course itself is there (offline?): the cells that need the rest say what is missing
            print(f"NOTICE: could not install {', '.join(missing)}: the cells that need them will say so.")
    tools_done, tools_missing = install_tools(tools)
    done += tools_done
    for tool in tools_missing:
        print(f"NOTICE: {tool} is missing and could not be installed here (`sudo apt-get install -y {tool}`, "
              f"`brew install {tool}`): the cells that need it will say so.")
    if done:
        print("Course setup: " + "; ".join(done) + ".")
    else:
        present = ", ".join([f"{DIST} {_installed(DIST)}" + (f" [{','.join(extras)}]" if extras else "")] + tools)
        print(f"Course setup: nothing to install ({present} already here).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
