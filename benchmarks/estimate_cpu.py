"""The activation estimate against torch's measured peak on CPU (the README's accuracy table).

The same tiny Llama-style model as tests/test_estimate.py; for each method / precision / micro-batch x sequence
length, one forward + backward is profiled (torch.profiler, CPU allocations, gradients allocated beforehand) and
the peak above the resting state is compared with the estimate's activations + logits (+ autocast copies).

    PYTHONPATH=operator python benchmarks/estimate_cpu.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_estimate import CASES, activation_point

POINTS = [(1, 32), (2, 64), (4, 128), (8, 256)]


def main() -> None:
    print("| method | precision | checkpointing | micro-batch x seq | estimate (MiB) | measured (MiB) | ratio |")
    print("|---|---|---|---|---:|---:|---:|")
    for method, autocast, checkpointing in CASES:
        for batch, seq in POINTS:
            predicted, measured = activation_point(method, autocast, checkpointing, batch, seq)
            mib = f"{predicted / 2**20:.2f} | {measured / 2**20:.2f}"
            print(f"| {method} | {'bf16 autocast' if autocast else 'fp32'} | {'on' if checkpointing else 'off'} "
                  f"| {batch} x {seq} | {mib} | {predicted / measured:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
