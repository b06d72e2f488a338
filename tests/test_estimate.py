"""The memory estimate against what torch really allocates, on CPU, for tiny GPT-2 / Llama / Qwen models.

Parameters, gradients and optimizer states must match to the byte; the activation peak of a training step (torch's
profiler, CPU allocations) within 25% at three micro-batch x sequence-length points (README: "Memory and time
estimate")."""

from __future__ import annotations

import tempfile
from typing import Any

import pytest

from finetune_operator import estimate as E

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LLAMA = {
    "model_type": "llama", "vocab_size": 2048, "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
}  # fmt: skip
QWEN2 = {**LLAMA, "model_type": "qwen2", "tie_word_embeddings": True}
QWEN3 = {**LLAMA, "model_type": "qwen3", "head_dim": 48, "tie_word_embeddings": False}
GPT2 = {"model_type": "gpt2", "vocab_size": 1000, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}


def _model(values: dict[str, Any]) -> Any:
    config = transformers.AutoConfig.for_model(**values)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _lora(model: Any, r: int = 8, dropout: float = 0.05) -> Any:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules="all-linear"))


def _train_step(model: Any, batch: int = 2, seq: int = 16) -> Any:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 100, (batch, seq))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return params, optimizer


def _optimizer_state_bytes(optimizer: Any) -> int:
    return sum(_bytes(v for v in state.values() if torch.is_tensor(v)) for state in optimizer.state.values())


@pytest.mark.parametrize("values", [GPT2, LLAMA, QWEN2, QWEN3], ids=["gpt2", "llama", "qwen2", "qwen3"])
def test_full_fine_tune_weights_gradients_and_adamw_states_match_torch_to_the_byte(values):
    model = _model(values)
    est = E.estimate(E.Architecture.from_config(values), E.Plan(method="full", compute="fp32", device="cpu"))
    assert est.parameters == sum(p.numel() for p in model.parameters())
    assert est.memory.weights == _bytes(model.parameters())
    params, optimizer = _train_step(model)
    assert est.memory.gradients == _bytes(p.grad for p in params)
    assert est.memory.optimizer_states == _optimizer_state_bytes(optimizer)


@pytest.mark.parametrize("values", [GPT2, LLAMA, QWEN3], ids=["gpt2", "llama", "qwen3"])
def test_lora_adapter_gradients_and_states_match_torch_to_the_byte(values):
    model = _lora(_model(values).to(torch.bfloat16), r=8)
    plan = E.Plan(method="lora", compute="bf16", lora_r=8, device="cpu")
    est = E.estimate(E.Architecture.from_config(values), plan)
    assert est.memory.weights == _bytes(p for p in model.parameters() if not p.requires_grad)
    params, optimizer = _train_step(model)
    assert est.trainable_parameters == sum(p.numel() for p in params)
    assert est.memory.gradients == _bytes(p.grad for p in params)  # PEFT keeps adapters (and grads) in fp32
    assert est.memory.optimizer_states == _optimizer_state_bytes(optimizer)


def test_named_lora_targets_count_only_those_modules():
    model = _lora(_model(LLAMA), r=4)  # peft's all-linear first, to compare with a q/v-only adapter
    from peft import LoraConfig, get_peft_model

    qv = get_peft_model(_model(LLAMA), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for targets, peft_model in ((("all-linear",), model), (("q_proj", "v_proj"), qv)):
        est = E.estimate(E.Architecture.from_config(LLAMA), E.Plan(method="lora", lora_r=4, lora_targets=targets))
        assert est.trainable_parameters == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_qlora_packed_weights_quant_state_and_fp32_upcast_match_bitsandbytes():
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training

    with tempfile.TemporaryDirectory() as tmp:
        _model(LLAMA).to(torch.bfloat16).save_pretrained(tmp)
        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16,
        )  # fmt: skip
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=quant, dtype=torch.bfloat16, device_map={"": "cpu"}
        )
    model = _lora(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), r=8)
    est = E.estimate(E.Architecture.from_config(LLAMA), E.Plan(method="qlora", lora_r=8, device="cpu"))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert est.memory.weights == _bytes(frozen)  # 4-bit packed linears + fp32 embeddings, norms, lm_head
    state = 0
    for p in frozen:
        if type(p).__name__ == "Params4bit":
            qs = p.quant_state
            state += _bytes([qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code])
    assert est.memory.quantization_state == state
    params, optimizer = _train_step(model)
    assert est.trainable_parameters == sum(p.numel() for p in params)
    assert est.memory.gradients == _bytes(p.grad for p in params)
    assert est.memory.optimizer_states == _optimizer_state_bytes(optimizer)


def measured_activation_peak(model: Any, batch: int, seq: int, autocast: bool) -> int:
    """Peak bytes allocated above the resting state during one forward + backward (torch profiler, CPU).

    Gradients are allocated beforehand (so they are not counted), and the model's outputs are dropped before the
    backward pass, as the Trainer does."""
    from torch.profiler import ProfilerActivity, profile

    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    ids = torch.randint(0, 500, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    step()  # warm-up: lazily created buffers (rotary caches) are not activations
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


ACT_MODEL = {**LLAMA, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2}
POINTS = [(1, 32), (2, 64), (4, 128)]
CASES = [  # (method, autocast bf16, gradient checkpointing)
    ("full", False, False), ("full", True, False), ("lora", False, False), ("lora", True, False),
    ("full", False, True), ("lora", True, True),
]  # fmt: skip


def activation_point(method: str, autocast: bool, checkpointing: bool, batch: int, seq: int) -> tuple[int, int]:
    """(estimated, measured) activation bytes of one forward + backward of the ACT_MODEL (also the benchmark's)."""
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
    mem = E.estimate(E.Architecture.from_config(ACT_MODEL), plan).memory
    return mem.activations + max(mem.logits, mem.recomputed_block) + mem.autocast_copies, measured


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'bf16' if c[1] else 'fp32'}{'-ckpt' if c[2] else ''}")
def test_activation_estimate_within_25_percent_of_the_measured_peak(case):
    for batch, seq in POINTS if not case[2] else POINTS[1:2]:
        predicted, measured = activation_point(*case, batch, seq)
        assert predicted == pytest.approx(measured, rel=0.25), (batch, seq, predicted, measured)


def test_known_architectures_give_the_published_parameter_counts():
    counts = {
        "hf://meta-llama/Llama-3.1-8B-Instruct": 8.03e9,
        "hf://mistralai/Mistral-7B-v0.1": 7.24e9,
        "hf://Qwen/Qwen2.5-0.5B": 0.494e9,
        "hf://Qwen/Qwen2.5-7B-Instruct": 7.62e9,
        "hf://meta-llama/Llama-3.2-1B": 1.24e9,
        "hf://mistralai/Mixtral-8x7B-v0.1": 46.7e9,
    }
    for source, published in counts.items():
        config, origin = E.load_config(source)
        assert origin == "table of common architectures"
        assert E.Architecture.from_config(config).parameters() == pytest.approx(published, rel=0.01), source
