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

import torch
from tests.test_estimate import ACT_MODEL, _lora, _model, measured_activation_peak

from finetune_operator import estimate as E

CASES = [("full", False, False), ("full", True, False), ("lora", False, False), ("lora", True, False),
         ("full", False, True), ("lora", True, True)]  # fmt: skip
POINTS = [(1, 32), (2, 64), (4, 128), (8, 256)]


def main() -> None:
    arch = E.Architecture.from_config(ACT_MODEL)
    print("| method | precision | checkpointing | micro-batch x seq | estimate (MiB) | measured (MiB) | ratio |")
    print("|---|---|---|---|---:|---:|---:|")
    for method, autocast, checkpointing in CASES:
        for batch, seq in POINTS:
            model = _model(ACT_MODEL)
            if method == "lora":
                model = _lora(model.to(torch.bfloat16) if autocast else model)
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                if method == "lora":
                    model.enable_input_require_grads()
            model.train()
            measured = measured_activation_peak(model, batch, seq, autocast)
            plan = E.Plan(
                method=method, micro_batch=batch, seq_len=seq, compute="bf16" if autocast else "fp32", lora_r=8,
                gradient_checkpointing=checkpointing, attention_mask=False, device="cpu",
            )  # fmt: skip
            mem = E.estimate(arch, plan).memory
            predicted = mem.activations + max(mem.logits, mem.recomputed_block) + mem.autocast_copies
            mib = f"{predicted / 2**20:.2f} | {measured / 2**20:.2f}"
            print(f"| {method} | {'bf16 autocast' if autocast else 'fp32'} | {'on' if checkpointing else 'off'} "
                  f"| {batch} x {seq} | {mib} | {predicted / measured:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
