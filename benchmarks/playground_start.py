"""Playground start time on the quickstart's model, and the README's screenshot.

Start time is from launching `finetune-operator playground OUTPUT` (a new Python process) to the first HTTP 200 of
its page, polled from the moment the process is started; the process then loads the base and the tuned model in
the background, and "models loaded" is when it says so (a Compare pressed before waits for them). Median of
--repeats starts, run one after the other, with the load average before and after. Run after the quickstart:

    finetune-operator run examples/quickstart/finetunejob.yaml --init-model tiny-gpt2
    nice -n 5 python benchmarks/playground_start.py [examples/quickstart/out] [--repeats 5] [--json FILE]
        [--baseline OLD/operator]      # another checkout's code, started alternately with this one
    python benchmarks/playground_start.py --screenshot docs/playground.png

With --screenshot it also opens the app in headless Chromium, compares the first eval prompt and saves the page.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.browser import chromium, compare, playground, wait_for  # noqa: E402

PAGE_TIMEOUT = 300  # seconds: a start slower than this is reported as a failure, not waited for


def first_ok(url: str, proc: subprocess.Popen[str], timeout: float = PAGE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the playground exited with {proc.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a running process (/proc/PID/stat), a figure a busy machine inflates less."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def start_once(output: Path, source: Path | None = None) -> dict[str, float]:
    """One start; `source`: another checkout's operator/ folder to run instead of this one (PYTHONPATH)."""
    saved = os.environ.get("PYTHONPATH")
    if source is not None:
        os.environ["PYTHONPATH"] = str(source)
    try:
        return _start_once(output)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _start_once(output: Path) -> dict[str, float]:
    with playground(output, wait=False) as server:
        first_ok(server.url, server.proc)
        page = time.monotonic() - server.started
        page_cpu = cpu_seconds(server.proc.pid)
        server.wait_serving(PAGE_TIMEOUT)
        if not server.models_loaded.wait(PAGE_TIMEOUT) or server.loaded_after is None:
            raise TimeoutError("the models did not load in time:\n" + "".join(server.output[-20:]))
        if any(line.startswith("error:") for line in server.output):
            raise RuntimeError("".join(server.output[-20:]))
        return {"page_s": page, "page_cpu_s": page_cpu, "loaded_s": server.loaded_after,
                "loaded_cpu_s": cpu_seconds(server.proc.pid)}  # fmt: skip


def summary(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def measure(output: Path, repeats: int, baseline: Path | None = None) -> dict[str, Any]:
    """`repeats` starts of this checkout; with `baseline`, as many of that one, alternated, so both see the same
    load on shared cores."""
    load_before = load_average()
    runs, baseline_runs = [], []
    for _ in range(repeats):
        runs.append(start_once(output))
        if baseline is not None:
            baseline_runs.append(start_once(output, baseline))
    result: dict[str, Any] = {"output": str(output), "runs": runs, "median": summary(runs), "load_before": load_before,
                              "cores": os.cpu_count()}  # fmt: skip
    if baseline is not None:
        result.update(baseline=str(baseline), baseline_runs=baseline_runs, baseline_median=summary(baseline_runs))
    result["load_after"] = load_average()
    return result


def table(result: dict[str, Any]) -> str:
    load = f"{result['load_before']:.1f}, {result['load_after']:.1f} ({result['cores']} cores)"
    lines = [f"| what | median s (of {len(result['runs'])}) | CPU s (median) | runs s | load average before, after |",
             "|---|---:|---:|---|---|"]  # fmt: skip
    sides = [("", "runs", "median")]
    if "baseline" in result:
        sides = [("this checkout: ", "runs", "median"), (f"{result['baseline']}: ", "baseline_runs", "baseline_median")]
    for name, runs_key, median_key in sides:
        runs, median = result[runs_key], result[median_key]
        for label, key in (("command start to the page's first HTTP 200", "page"),
                           ("command start to both models loaded", "loaded")):  # fmt: skip
            walls = ", ".join(f"{r[f'{key}_s']:.1f}" for r in runs)
            lines.append(
                f"| {name}{label} | {median[f'{key}_s']:.1f} | {median[f'{key}_cpu_s']:.1f} | {walls} | {load} |"
            )
    return "\n".join(lines)


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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the runs and medians to this file")
    parser.add_argument("--baseline", help="another checkout's operator/ folder, started alternately for comparison")
    parser.add_argument("--screenshot", help="also save a screenshot of a comparison to this PNG")
    args = parser.parse_args()
    output = Path(args.output)
    result = measure(output, args.repeats, Path(args.baseline) if args.baseline else None)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.screenshot:
        screenshot(output, Path(args.screenshot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
