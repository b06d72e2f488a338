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


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a running process (/proc/PID/stat), a figure a busy machine does not inflate."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(output: Path, repeats: int) -> tuple[list[float], list[float]]:
    walls, cpus = [], []
    for _ in range(repeats):
        with playground(output) as server:
            first_ok(server.url)
            walls.append(time.monotonic() - server.started)
            cpus.append(cpu_seconds(server.proc.pid))
    return walls, cpus


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
    walls, cpus = measure(output, args.repeats)
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"| what | wall s (median of {len(walls)}) | CPU s (median) | wall runs | load average |")
    print("|---|---:|---:|---|---:|")
    print(
        f"| playground start, {output} (process start to first page) | {statistics.median(walls):.1f} | "
        f"{statistics.median(cpus):.1f} | {', '.join(f'{t:.1f}' for t in walls)} | {load} |"
    )
    if args.screenshot:
        screenshot(output, Path(args.screenshot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
