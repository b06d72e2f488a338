"""Playground start time on the quickstart's model, and the README's screenshot.

Start time is from launching `finetune-operator playground OUTPUT` (a new Python process: imports, both models
loaded, Gradio up) to the first HTTP 200 of its page, median of --repeats starts. Run after the quickstart:

    finetune-operator run examples/quickstart/finetunejob.yaml --init-model tiny-gpt2
    python benchmarks/playground_start.py [examples/quickstart/out] [--repeats 3] [--screenshot docs/playground.png]

With --screenshot it also opens the app in headless Chromium, compares the first eval prompt and saves the page.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.browser import chromium, compare, playground, wait_for  # noqa: E402


def first_ok(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def measure(output: Path, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        with playground(output) as server:
            first_ok(server.url)
            times.append(time.monotonic() - server.started)
    return times


def screenshot(output: Path, target: Path) -> None:
    from finetune_operator.playground.target import resolve

    prompt = resolve(output).samples()[0]["prompt"].rstrip("\n")
    with playground(output) as server, chromium() as driver:
        driver.set_window_size(1440, 1000)
        driver.get(server.url)
        wait_for(driver, lambda d: d.find_elements("id", "compare-button"), 60)
        base, tuned, state = compare(driver, prompt)
        print(f"prompt {prompt!r}: base {base!r}, tuned {tuned!r} ({state})")
        time.sleep(0.5)  # let the last frame paint
        driver.save_screenshot(str(target))
    print(f"wrote {target}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", default=str(REPO / "examples" / "quickstart" / "out"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--screenshot", help="also save a screenshot of a comparison to this PNG")
    args = parser.parse_args()
    output = Path(args.output)
    times = measure(output, args.repeats)
    print(f"| what | seconds (median of {len(times)}) | runs |")
    print("|---|---:|---|")
    print(f"| playground start, {output.name} (process start to first page) | {statistics.median(times):.1f} | "
          + ", ".join(f"{t:.1f}" for t in times) + " |")  # fmt: skip
    if args.screenshot:
        screenshot(output, Path(args.screenshot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
