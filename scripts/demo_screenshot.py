"""The README's picture of the demo: ``python app.py`` serves a trained assistant on 127.0.0.1, Debian's Chromium
(driven by playwright) uploads a held-out picture and asks two questions, and the page is saved as a PNG.

    python scripts/demo_screenshot.py                    # the tiny course's assistant (run the notebooks first)
    python scripts/demo_screenshot.py --model DIR --image PICTURE --out docs/demo.png
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def held_out_picture(world: Path) -> tuple[Path, list[str]]:
    """A held-out picture and two questions about it, from the world's own held-out conversations."""
    records = json.loads((world / "llava_instruct_val.json").read_text())
    for record in records:
        humans = [m["value"].replace("<image>", "").strip() for m in record["conversations"] if m["from"] == "human"]
        if len(humans) >= 2:
            return world / "val2017" / record["image"], humans[:2]
    raise SystemExit(f"no held-out conversation with two questions in {world}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "outputs/tiny/03_qlora_instruct/merged"))
    parser.add_argument("--world", default=str(ROOT / "outputs/tiny/data/world"))
    parser.add_argument("--out", default=str(ROOT / "docs/demo.png"))
    parser.add_argument("--chromium", default=os.environ.get("MMPHI_CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args(argv)
    from playwright.sync_api import expect, sync_playwright

    picture, questions = held_out_picture(Path(args.world))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MMPHI_PROFILE": "tiny", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "app.py", "--model", args.model, "--host", "127.0.0.1", "--port",
                               str(port)], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, headless=True,
                                        args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(url, wait_until="domcontentloaded")
            page.get_by_role("button", name="Ask", exact=True).wait_for()
            page.get_by_test_id("image").locator("input[type=file]").set_input_files(str(picture))
            page.get_by_text("New image: ask a question about it.").wait_for()
            for turn, question in enumerate(questions, 1):
                page.get_by_label("Ask by text").fill(question)
                page.get_by_role("button", name="Ask", exact=True).click()
                expect(page.get_by_test_id("bot")).to_have_count(turn)
                expect(page.get_by_label("Ask by text")).to_have_value("")
            time.sleep(1)
            # the conversation from its first question (the chat box scrolls to the newest answer)
            page.evaluate("document.querySelectorAll('.bubble-wrap, [role=log]').forEach(e => e.scrollTop = 0)")
            time.sleep(0.5)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, clip={"x": 0, "y": 0, "width": 1280, "height": 720})
            answers = [a.inner_text() for a in page.get_by_test_id("bot").all()]
            browser.close()
        print(f"{args.out}: {picture.name}, " + "; ".join(f"{q} -> {a}" for q, a in zip(questions, answers)))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
