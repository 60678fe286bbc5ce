"""Downloads a learner can trust: parallel, resumable, atomic, retried with back-off, with a progress bar.

* **atomic** – each file is written to ``<name>.part`` and renamed into place when complete, so a killed download
  never leaves a half file that a later run would count as an image;
* **resumable** – files already in place are skipped, so a rerun after a disconnect fetches only what is missing;
* **retried** – a failed fetch is tried again after 1, 2, 4, ... seconds; a URL that keeps failing is counted and
  skipped, never fatal;
* **checked** – images are decoded once after download; an unreadable one is counted and kept out of the data.

``file://`` URLs go through the same code (local copies of the data, e.g. the rehearsal's stand-ins).
"""
from __future__ import annotations

import os
import shutil
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

USER_AGENT = "mmphi-course/0.1 (+https://github.com)"


@dataclass
class DownloadReport:
    fetched: int = 0
    already_there: int = 0
    failed: Counter = field(default_factory=Counter)  # reason -> count
    failed_files: list = field(default_factory=list)

    @property
    def ok(self) -> int:
        return self.fetched + self.already_there

    def summary(self) -> str:
        bad = ", ".join(f"{n} {reason}" for reason, n in self.failed.most_common()) or "none"
        return f"{self.fetched} fetched, {self.already_there} already there, failed: {bad}"


def fetch(url: str, target: Path, tries: int = 4, backoff: float = 1.0, timeout: float = 30.0) -> str | None:
    """Fetch `url` into `target` atomically. Returns None on success, else the reason it failed."""
    part = target.with_name(target.name + ".part")
    reason = "not tried"
    for attempt in range(tries):
        try:
            request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
            os.replace(part, target)
            return None
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code}"
            if exc.code in (403, 404, 410):  # retrying will not help
                break
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, FileNotFoundError):  # a file:// URL of a missing file
                reason = "missing at the source"
                break
            reason = type(exc).__name__
        except (OSError, ValueError) as exc:  # URLError, timeouts, connection resets
            reason = type(exc).__name__
        if attempt + 1 < tries:
            time.sleep(backoff * 2 ** attempt)
    part.unlink(missing_ok=True)
    return reason


def image_readable(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # PIL raises many kinds for truncated or non-image files
        return False


def fetch_all(jobs: list[tuple[str, Path]], workers: int = 16, desc: str = "downloading", check_images: bool = True,
              tries: int = 4, backoff: float = 1.0, progress: bool = True) -> DownloadReport:
    """Fetch every (url, target) not already in place, `workers` at a time. Unreadable images are removed after
    download (and counted), so only decodable images remain under their final names."""
    from tqdm.auto import tqdm

    report = DownloadReport()
    todo = []
    for url, target in jobs:
        if target.exists():
            report.already_there += 1
        elif target.with_name(target.name + ".unreadable").exists():  # found unreadable by an earlier run
            report.failed["unreadable image"] += 1
            report.failed_files.append(target.name)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            todo.append((url, target))

    def one(url, target):
        reason = fetch(url, target, tries=tries, backoff=backoff)
        if reason is None and check_images and not image_readable(target):
            bad = target.with_name(target.name + ".unreadable")
            os.replace(target, bad)  # kept aside (a rerun does not fetch it again), never counted as an image
            reason = "unreadable image"
        return target, reason

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(todo), desc=desc, unit="file", disable=not progress or not todo) as bar:
        for future in as_completed([pool.submit(one, url, target) for url, target in todo]):
            target, reason = future.result()
            if reason is None:
                report.fetched += 1
            else:
                report.failed[reason] += 1
                report.failed_files.append(target.name)
            bar.update(1)
    print(f"{desc}: {report.summary()}", flush=True)
    return report
