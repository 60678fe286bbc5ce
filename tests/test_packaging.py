"""The course installs the way the README says: pinned versions, one repository URL, setup cells that install it
when a notebook is opened alone, one way to save figures."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import nbformat
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from helpers.requirements_check import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(ROOT.glob("0*.ipynb"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def setup_cell(notebook: Path) -> str:
    cell = nbformat.read(notebook, as_version=4).cells[1]
    assert cell.cell_type == "code" and cell.source.startswith("# Setup"), notebook.name
    return cell.source


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version and not line.startswith("-"), f"constraints.txt: not a pin: {line!r}"
        assert canonicalize_name(name) not in pins, f"constraints.txt pins {name} twice"
        pins[canonicalize_name(name)] = version
    return pins


def test_every_requirement_is_pinned_within_its_specifier():
    project = PYPROJECT["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    pins = constraints()
    problems = []
    for text in requirements:
        req = Requirement(text)
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{req.name} is not pinned in constraints.txt")
        elif not req.specifier.contains(pin, prereleases=True):
            problems.append(f"{req.name}=={pin} does not satisfy pyproject's {text!r}")
    assert not problems, "\n".join(problems)
    assert pins["torch"] == "2.13.0" and canonicalize_name(project["name"]) not in pins


def test_repository_url_and_ref_are_the_same_everywhere():
    repo = PYPROJECT["project"]["urls"]["Repository"]
    ref = f"v{PYPROJECT['project']['version']}"
    for notebook in NOTEBOOKS:
        source = setup_cell(notebook)
        assert f'os.environ.get("COURSE_REPO", "{repo}")' in source, notebook.name
        assert f'os.environ.get("COURSE_REF", "{ref}")' in source, notebook.name
    # the cells differ only in what the notebook needs
    bodies = {re.sub(r"(?m)^NEEDS = .*$", "NEEDS = ...", setup_cell(nb)) for nb in NOTEBOOKS}
    assert len(bodies) == 1
    badges = re.findall(r"https://colab\.research\.google\.com/github/([^)\s]+)", (ROOT / "README.md").read_text())
    owner_repo = repo.removeprefix("https://github.com/")
    assert {f"{owner_repo}/blob/{ref}/{nb.name}" for nb in NOTEBOOKS} == set(badges)


def test_audio_notebooks_ask_for_their_extras_and_espeak():
    needs = {nb.name[:2]: re.search(r"(?m)^NEEDS = (.*?)  #", setup_cell(nb)).group(1) for nb in NOTEBOOKS}
    assert needs["04"] == '["--extras", "audio", "--tools", "espeak-ng"]'
    assert needs["05"] == '["--extras", "audio,demo", "--tools", "espeak-ng"]'
    assert needs["01"] == needs["02"] == needs["03"] == "[]"


def test_figures_are_saved_in_one_place():
    savers = sorted(str(p.relative_to(ROOT / "helpers")) for p in (ROOT / "helpers").rglob("*.py")
                    if "savefig" in p.read_text())
    assert savers == ["views/reporting.py"]


def cell_as_script(notebook: Path) -> str:
    """The setup cell as plain Python (IPython magics dropped)."""
    return "\n".join(line for line in setup_cell(notebook).splitlines() if not line.lstrip().startswith("%"))


def test_setup_cell_inside_the_checkout_installs_nothing():
    env = {k: v for k, v in os.environ.items() if not k.startswith("COURSE_")}
    out = subprocess.run([sys.executable, "-c", cell_as_script(ROOT / "01_pretrain_phi.ipynb")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Course setup: nothing to install" in out.stdout, out.stdout


def _course_repo_copy(target: Path) -> str:
    """A Git repository holding the working tree as it is now (committed or not); returns its HEAD commit."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    git = ["git", "-C", str(target), "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "course under test"], check=True)
    return subprocess.run(git[:3] + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


def test_notebook_opened_alone_installs_the_course_from_its_repository(tmp_path):
    """Notebook 01 alone in an empty folder, a Python where the heavy dependencies are importable but `helpers`
    is not: its first cell installs the course from COURSE_REPO at COURSE_REF, and `import helpers` works."""
    if shutil.which("git") is None:
        skip_or_fail("git is needed to install the course from a repository")
    start = time.perf_counter()
    repo = tmp_path / "repo"
    ref = _course_repo_copy(repo)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # a path line in a .pth: this environment's packages are found, their own .pth files (the editable course's
    # import hook) are not run
    Path(site, "heavy_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(ROOT / "01_pretrain_phi.ipynb", alone)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("COURSE_")}
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    url = f"file://localhost{repo}"  # a local repository as pip's git+ and git both take it
    env.update(COURSE_REPO=url, COURSE_REF=ref, TMPDIR=str(scratch))

    def run(code: str):
        return subprocess.run([str(python), "-c", code], cwd=alone, env=env, capture_output=True, text=True,
                              timeout=120)

    before = run("import importlib.util, torch, transformers; print(importlib.util.find_spec('helpers'))")
    assert before.returncode == 0 and before.stdout.strip() == "None", before.stdout + before.stderr
    script = cell_as_script(alone / "01_pretrain_phi.ipynb") + "\nimport helpers.config; print('HELPERS', helpers.__file__)"
    out = run(script)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Course setup: installed the course from {url} at {ref}" in out.stdout, out.stdout
    assert "HELPERS " + site in out.stdout, out.stdout  # installed into the fresh environment, not found elsewhere
    again = run(cell_as_script(alone / "01_pretrain_phi.ipynb"))  # a second run has nothing to do
    assert again.returncode == 0 and "nothing to install" in again.stdout, again.stdout + again.stderr
    assert sorted(p.name for p in alone.iterdir()) == ["01_pretrain_phi.ipynb"]  # nothing written next to it
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("mmphi-")]  # temporary copies removed
    print(out.stdout, again.stdout, f"standalone setup: {time.perf_counter() - start:.1f} s", sep="\n")


def test_setup_script_pieces(tmp_path, monkeypatch):
    from helpers import notebook_setup as setup

    assert setup.pip_url("https://example.org/mmphi.git") == "https://example.org/mmphi.git"
    assert setup.pip_url(str(tmp_path)) == f"file://localhost{tmp_path}"  # pip refuses file:/// (no host)
    assert setup.pip_url(f"file://{tmp_path}") == f"file://localhost{tmp_path}"
    assert setup.missing_packages(["audio", "demo", "dev"]) == []  # this environment has everything
    # an installed PyTorch stack is kept: its pins are left out, the others stay
    pins = tmp_path / "constraints.txt"
    pins.write_text("# comment\nnumpy==2.0.0\ntorch==2.13.0\ntriton==3.9.0\nnvidia-cublas-cu12==1.0\n")
    installed = {"torch": "2.8.0+cu126", "triton": "3.4.0"}
    monkeypatch.setattr(setup, "_installed", installed.get)
    kept, out = setup.usable_constraints(pins)
    assert out == ["torch 2.8.0+cu126", "triton 3.4.0"]
    assert kept.read_text().splitlines() == ["# comment", "numpy==2.0.0", "nvidia-cublas-cu12==1.0"]
    installed.clear()
    assert setup.usable_constraints(pins) == (pins, [])


def test_notebook_opened_alone_with_the_placeholder_or_a_bad_repository_says_what_to_do(tmp_path):
    """Opened alone (no checkout, `helpers` not importable, pip there), the first cell stops with what to do instead
    of a CalledProcessError, for the placeholder repository and for a repository git cannot fetch, after pip's and
    git's own messages, without waiting for a password (GIT_TERMINAL_PROMPT=0). Catches a setup cell that tracebacks
    or hangs."""
    if shutil.which("git") is None:
        skip_or_fail("git is needed to try fetching from a repository")
    venv = tmp_path / "venv"  # a Python with pip and nothing else: neither the course nor its dependencies
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    alone = tmp_path / "alone"
    alone.mkdir()
    script = cell_as_script(ROOT / "01_pretrain_phi.ipynb")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("COURSE_")}
    for repo in (None, f"file://localhost{tmp_path / 'no-such-repository'}"):
        if repo:
            env.update(COURSE_REPO=repo, COURSE_REF="v0")
        out = subprocess.run([str(venv / "bin" / "python"), "-c", script], cwd=alone, env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 1 and "Could not install the course from" in out.stderr, out.stderr
        assert "clone of the whole course" in out.stderr and "Traceback" not in out.stderr, out.stderr
