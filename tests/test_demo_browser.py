"""The demo as a learner uses it: ``python app.py`` serves a small random LLaVA on 127.0.0.1, and Chromium (Debian's
``chromium``, driven by playwright) uploads an image, asks, asks a follow-up and uploads files that are not images.

Skipped, with the reason, when playwright or Chromium is missing or Chromium cannot start (failed instead under
MMPHI_REQUIRE_ALL=1, as in CI); never passes without the browser having seen the answers.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers.requirements_check import import_or_skip_or_fail, skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("MMPHI_CHROMIUM", "/usr/bin/chromium")
WAIT_MS = 30_000  # one answer of a random tiny model takes about a second; the margin is for a loaded CI machine


@pytest.fixture(scope="module")
def browser():
    import_or_skip_or_fail("playwright.sync_api", "playwright is not installed (pip install -e '.[dev]')")
    from playwright.sync_api import sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        skip_or_fail(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MMPHI_CHROMIUM)")
    with sync_playwright() as p:
        try:
            chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        except Exception as exc:  # no display libraries, sandbox refused, ...
            skip_or_fail(f"Chromium at {CHROMIUM} cannot be started: {type(exc).__name__}: {exc}")
        yield chromium
        chromium.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(saved_llava, tmp_path_factory):
    """``python app.py --model <random tiny LLaVA>`` on a free port of 127.0.0.1; its URL once it answers."""
    port, log = _free_port(), tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "MMPHI_PROFILE": "tiny", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "app.py", "--model", str(saved_llava), "--host", "127.0.0.1",
                                   "--port", str(port)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                pytest.fail(f"app.py stopped (exit {server.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer on {url} within 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture
def page(browser, app_url):
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    # gradio pages offline never reach "networkidle": wait for the app's own controls instead
    page.goto(app_url, wait_until="domcontentloaded")
    page.get_by_role("button", name="Ask", exact=True).wait_for()
    yield page
    page.close()


@pytest.fixture(scope="module")
def picture(world):
    records = json.loads(world.instruct("val").read_text())
    return world.images("val") / records[0]["image"]


def upload_image(page, path):
    page.get_by_test_id("image").locator("input[type=file]").set_input_files(str(path))


def ask(page, question: str, turn: int, press_enter: bool = False) -> str:
    """Type `question`, send it, wait until the answer of `turn` (1, 2, ...) is complete; return the status."""
    from playwright.sync_api import expect

    box = page.get_by_label("Ask by text")
    box.fill(question)
    if press_enter:
        box.press("Enter")
    else:
        page.get_by_role("button", name="Ask", exact=True).click()
    # the turn's first update shows the question and "answering…"; its last one says "Answered in ... s"
    expect(page.get_by_test_id("user")).to_have_count(turn)
    expect(page.get_by_test_id("user").nth(turn - 1)).to_have_text(question)
    status = page.get_by_text(re.compile(r"Answered in \d"))
    status.wait_for()
    expect(page.get_by_test_id("bot")).to_have_count(turn)
    assert page.get_by_test_id("bot").nth(turn - 1).inner_text().strip(), "the answer is empty"
    expect(box).to_have_value("")  # the question box is cleared for the next one
    return status.inner_text()


def shown_prompt(page) -> str:
    accordion = page.get_by_text("Prompt given to the model")
    prompt = page.get_by_test_id("accordion-content").locator("textarea")
    if not prompt.is_visible():
        accordion.click()
    return prompt.input_value()


def test_upload_ask_and_follow_up_in_the_browser(page, picture):
    start = time.perf_counter()
    upload_image(page, picture)
    page.get_by_text("New image: ask a question about it.").wait_for()
    ask(page, "Where is the red circle?", turn=1)
    assert shown_prompt(page) == "USER: <image>\nWhere is the red circle? ASSISTANT:"

    ask(page, "And what colour is it?", turn=2, press_enter=True)
    prompt = shown_prompt(page)  # the prompt the model was given (test_demo checks it is exactly what it used)
    assert prompt.startswith("USER: <image>\nWhere is the red circle? ASSISTANT:"), prompt
    assert prompt.endswith("<|endoftext|>USER: And what colour is it? ASSISTANT:"), prompt
    print(f"browser conversation: {time.perf_counter() - start:.1f} s")


def test_files_that_are_not_images_get_a_message_in_the_browser(page, picture, tmp_path):
    text = "this is not a picture\n" * 20
    (tmp_path / "notes.txt").write_text(text)
    (tmp_path / "holiday.jpg").write_text(text)  # an image by its name only: the app itself must catch it

    upload_image(page, tmp_path / "notes.txt")  # refused by the browser side of gradio (not image/*)
    page.get_by_text(re.compile(r"Invalid file type: notes\.txt")).wait_for()

    upload_image(page, tmp_path / "holiday.jpg")
    message = re.compile(r"⚠️ holiday\.jpg is not an image that can be read")
    page.get_by_text(message).wait_for()
    page.get_by_role("button", name="Clear chat").click()
    page.get_by_text("Chat cleared: ask a new question.").wait_for()
    page.get_by_label("Ask by text").fill("Where is the red circle?")
    page.get_by_role("button", name="Ask", exact=True).click()  # asking about it gets the message too
    page.get_by_text(message).wait_for()
    assert page.get_by_test_id("bot").count() == 0

    upload_image(page, picture)  # and the app still answers
    ask(page, "How many objects are there?", turn=1)
