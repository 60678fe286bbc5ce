"""What happens when an optional part (espeak-ng, a Whisper model, openai-whisper, Chromium, git) is missing.

On a learner's machine the cells and tests that need it say so and carry on (a NOTICE, a skipped test). CI sets
``MMPHI_REQUIRE_ALL=1``: there every missing part stops the run with the reason, so nothing passes untested.

Also a pytest plugin (``pytest -p helpers.requirements_check``, as scripts/test.sh does): under the variable a run
with any skipped test fails. Standard library only.
"""
from __future__ import annotations

import os

REQUIRE_ALL_ENV = "MMPHI_REQUIRE_ALL"


class MissingRequirement(RuntimeError):
    """A part the course uses is missing, and MMPHI_REQUIRE_ALL=1 asks for all of them."""


def require_all() -> bool:
    return os.environ.get(REQUIRE_ALL_ENV, "").strip().lower() not in ("", "0", "false", "no")


def missing(reason: str) -> None:
    """In a notebook: raise under MMPHI_REQUIRE_ALL=1, else print ``NOTICE: <reason>`` and carry on."""
    if require_all():
        raise MissingRequirement(f"{reason} ({REQUIRE_ALL_ENV}=1: nothing may be left out)")
    print(f"NOTICE: {reason}")


def skip_or_fail(reason: str):
    """In a test: fail under MMPHI_REQUIRE_ALL=1, else skip; with the same reason."""
    import pytest

    __tracebackhide__ = True  # reported at the test's line, not here
    if require_all():
        pytest.fail(f"{reason} ({REQUIRE_ALL_ENV}=1: no test may be skipped)", pytrace=False)
    pytest.skip(reason)


def import_or_skip_or_fail(module: str, reason: str):
    """``pytest.importorskip`` that fails under MMPHI_REQUIRE_ALL=1."""
    import importlib

    __tracebackhide__ = True
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        error = f"{type(exc).__name__}: {exc}"
    skip_or_fail(f"{reason} ({error})")


def pytest_sessionfinish(session, exitstatus):
    """Under MMPHI_REQUIRE_ALL=1 a skip from anywhere (a test, a fixture, a notebook) fails the run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if require_all() and skipped:
        reporter.write_line(f"\n{REQUIRE_ALL_ENV}=1: {skipped} skipped, and CI allows none "
                            "(their reasons are in the short test summary)", red=True, bold=True)
        if session.exitstatus == 0:
            session.exitstatus = 1
