"""Recovery of a tiny Llama: LoRA adapters merged back into dense weights (still saves with
save_pretrained), and full fine-tuning of the exported-program fallback (gradients reach its state)."""
from __future__ import annotations

import pytest
import torch

import prunec
from prunec.program_module import ProgramModule
from prunec.recover import Recovery

transformers = pytest.importorskip("transformers")
SEQ = 16


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                                   initializer_range=0.2)  # peaked logits: something to distil
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).eval()


def _batches(n: int, batch: int = 4, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 96, (batch, SEQ), generator=gen), "use_cache": False} for _ in range(n)]


def _compile(model: torch.nn.Module, **ratios: float) -> prunec.CompileResult:
    kwargs = {"input_ids": torch.randint(0, 96, (4, SEQ)), "use_cache": False}  # the program's batch
    return prunec.compile(model, (), example_kwargs=kwargs, round_to=1, **ratios)


def test_lora_merges_into_a_plain_model_that_saves(tmp_path) -> None:
    pytest.importorskip("peft")
    teacher = _llama()
    student = _compile(teacher, mlp=0.5).model
    assert isinstance(student, transformers.LlamaForCausalLM)
    n_params = sum(p.numel() for p in student.parameters())
    embed = student.model.embed_tokens.weight.clone()
    run = Recovery(lora=4, lr=1e-2, eval_data=_batches(2, seed=5)).run(student, teacher, _batches(4), 12)
    model = run.model
    assert type(model) is transformers.LlamaForCausalLM
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert torch.equal(model.model.embed_tokens.weight, embed)  # tied head was not adapted
    loss = run.report["loss"]
    assert sum(loss[-3:]) < 0.9 * sum(loss[:3])
    # held-out KD falls only if the trained adapters were merged into the returned weights
    assert run.report["after"]["kd_loss"] < run.report["before"]["kd_loss"]
    model.save_pretrained(tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = _batches(1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_program_module_fallback_of_an_llm_trains() -> None:
    teacher = _llama()
    program = _compile(teacher, heads=0.5).program
    assert isinstance(program, ProgramModule)
    before = {k: v.clone() for k, v in program.state_dict().items()}
    run = Recovery(lr=3e-3, eval_data=_batches(2, seed=5)).run(program, teacher, _batches(4), 10)
    assert run.report["program_module"]
    assert all(not torch.equal(before[k], v) for k, v in program.state_dict().items() if k.endswith("proj.weight"))
    assert run.report["after"]["kd_loss"] < 0.95 * run.report["before"]["kd_loss"]  # 1.51 → 1.39
