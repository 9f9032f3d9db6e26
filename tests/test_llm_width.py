"""LLM width criteria with reconstruction: any-shape calibration, FLAP, Wanda-sp, the LS refit, and
sequential (block-by-block) 2:4 calibration. Tiny models, a few seconds each."""
import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import prunec
from prunec.analyze import build_coupling
from prunec.cli import main
from prunec.passes import Flap, State, Wanda, WandaSP
from prunec.trace import trace

from conftest import assert_verified, make_hf_llama

transformers = pytest.importorskip("transformers")


def tiny_llama(layers: int = 2) -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def example() -> dict:
    return {"input_ids": torch.randint(0, 64, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long),
            "use_cache": False}


def state_for(model: nn.Module, args: tuple, kwargs: dict, calib: list) -> State:
    program = trace(model, args, kwargs)
    return State(model, program, build_coupling(program), calib=calib)


def down_proj_sq(model: nn.Module, calib: list, layer: int) -> torch.Tensor:
    """Σ x² per channel of down_proj's input, by a module hook on the eager model."""
    acc = []
    hook = model.model.layers[layer].mlp.down_proj.register_forward_hook(
        lambda m, a, o: acc.append(a[0].detach().double().reshape(-1, a[0].shape[-1]).pow(2).sum(0)))
    with torch.no_grad():
        for batch in calib:
            model(**batch, use_cache=False)
    hook.remove()
    return sum(acc)


def test_calibration_batches_of_any_length_and_batch_size() -> None:
    """Batches shaped unlike the (2, 16) example — other batch sizes and lengths, with or without a
    mask — score like module hooks on the eager model say (the static trace used to crash)."""
    model = tiny_llama()
    calib = [{"input_ids": torch.randint(0, 64, (3, 10))},
             {"input_ids": torch.randint(0, 64, (1, 23)), "attention_mask": torch.ones(1, 23, dtype=torch.long)},
             {"input_ids": torch.randint(0, 64, (2, 16))}]
    state = state_for(model, (), example(), calib)
    Wanda().run(state)
    group = next(g for g in state.coupling.groups if g.name.startswith("model.layers.1.mlp"))
    w = model.model.layers[1].mlp.down_proj.weight.detach().double()
    want = w.abs().sum(0) * down_proj_sq(model, calib, 1).sqrt()
    want = (want / want.mean()).numpy()
    got = state.scores[group.name]
    rows = next(r for (f, d), r in group.members.items() if f.endswith("down_proj.weight") and d == 1)
    assert got.shape == (48,) and rows.shape == (48, 1)
    torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(want[rows[:, 0]]), rtol=1e-6, atol=1e-9)


def test_refit_lowers_output_error_vs_the_original() -> None:
    model = tiny_llama()
    calib = [{"input_ids": torch.randint(0, 64, (4, 20))} for _ in range(3)]
    r = prunec.compile(model, (), example_kwargs=example(), mlp=0.5, heads=0.5, method="wanda", round_to=1,
                       calib=calib, refit="ls")
    assert_verified(r)
    refit = r.report["verify"]["refit"]
    assert refit["applied"] and refit["tensors"] == 4   # 2 down_proj + 2 o_proj
    assert refit["rel_err_after"] < 0.8 * refit["rel_err_before"], refit
    errors = r.report["passes"]["refit"]["errors"]
    assert len(errors) == 4 and all(after < before for before, after in errors.values())
    assert r.report["passes"]["refit"]["sequential"]   # block 1 refit on block 0's pruned output
    one = prunec.compile(model, (), example_kwargs=example(), mlp=0.5, heads=0.5, method="wanda", round_to=1,
                         calib=calib, refit="ls", sequential=False)
    assert not one.report["passes"]["refit"]["sequential"]
    assert one.plan.kept == r.plan.kept and one.report["verify"]["refit"]["applied"]
    second = "model.layers.1.mlp.down_proj.weight"   # other inputs → another solution for block 1
    assert not torch.allclose(one.program.state_dict()[second], r.program.state_dict()[second], atol=1e-6)
    ids = torch.randint(0, 64, (2, 9))   # the result runs any shape with the refit weights in it
    assert r.model(input_ids=ids).logits.shape == (2, 9, 64)


class ConstMLP(nn.Module):
    """fc1 → relu → fc2; channels 0–7 of the hidden layer are constant (zero weight, positive bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        with torch.no_grad():
            self.fc1.weight[:8] = 0
            self.fc1.bias[:8] = torch.linspace(0.5, 2.0, 8)
            self.fc1.weight[8:] *= 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_flap_drops_constant_channels_and_bias_compensation_is_exact() -> None:
    model = ConstMLP().eval()
    calib = [(torch.randn(32, 8),) for _ in range(2)]
    x = torch.randn(5, 8)
    comp = prunec.compile(model, (torch.randn(4, 8),), channels=0.5, method="flap", round_to=1, calib=calib)
    plain = prunec.compile(model, (torch.randn(4, 8),), channels=0.5, method="flap", round_to=1, calib=calib,
                           refit="none")
    assert_verified(comp)
    assert [g["kept"] for g in comp.report["groups"]] == [8]
    assert comp.plan.kept[next(iter(comp.plan.kept))] == list(range(8, 16))   # Var = 0 for the constant ones
    with torch.no_grad():
        torch.testing.assert_close(comp.model(x), model(x), atol=1e-5, rtol=1e-5)
        assert (plain.model(x) - model(x)).abs().max() > 0.1   # without compensation it is off


def test_wanda_sp_sums_producer_rows_and_consumer_columns() -> None:
    model = ConstMLP().eval()
    with torch.no_grad():
        model.fc1.weight.normal_()
    calib = [(torch.randn(16, 8),), (torch.randn(7, 8),)]
    state = state_for(model, (torch.randn(4, 8),), {}, calib)
    WandaSP().run(state)
    xs = torch.cat([b[0] for b in calib]).double()
    h = torch.relu(xs @ model.fc1.weight.double().T + model.fc1.bias.double())
    cons = model.fc2.weight.double().abs().sum(0) * h.pow(2).sum(0).sqrt()
    prod = model.fc1.weight.double().abs() @ xs.pow(2).sum(0).sqrt()
    want = cons / cons.mean() + prod / prod.mean()
    (name, got), = state.scores.items()
    torch.testing.assert_close(torch.as_tensor(got), want, rtol=1e-6, atol=1e-9)
    Flap().run(state)   # FLAP ranks by Var × ‖W col‖²: a different order than Wanda-sp here
    assert state.scores[name].shape == (16,)


def test_sequential_sparsegpt_calibrates_each_block_on_the_sparsified_blocks_before_it() -> None:
    from prunec.backends.sparsity import _capture, _sparsegpt, _to_groups_layout, check_2_4, sparsify_2_4
    model = tiny_llama(layers=3)
    calib = [((), {"input_ids": torch.randint(0, 64, (2, 24)), "use_cache": False}) for _ in range(2)]
    seq, one = copy.deepcopy(model), copy.deepcopy(model)
    stats = sparsify_2_4(seq, "sparsegpt", calib)
    sparsify_2_4(one, "sparsegpt", calib, sequential=False)
    assert stats["sequential_blocks"] == 3 and stats["mean_sparsity"] == 0.5
    ref = copy.deepcopy(model)   # by hand: block i's Hessians from a forward of the model so far
    for i in range(3):
        layers = {n: m for n, m in ref.named_modules() if isinstance(m, nn.Linear) and f"layers.{i}." in n}
        hess, _ = _capture(ref, layers, calib, "sparsegpt")
        with torch.no_grad():
            for n, m in layers.items():
                m.weight.copy_(_sparsegpt(_to_groups_layout(m.weight), hess[n], 0.01))
    for (n, a), b, c in zip(seq.named_parameters(), ref.parameters(), one.parameters()):
        if n.endswith("proj.weight"):
            assert check_2_4(a), n
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    last = seq.model.layers[2].mlp.down_proj.weight
    assert not torch.allclose(last, one.model.layers[2].mlp.down_proj.weight, atol=1e-4)


def test_cli_flap_with_least_squares_refit(tmp_path: Path) -> None:
    folder = make_hf_llama(tmp_path / "llama")
    out, report = tmp_path / "out", tmp_path / "r.json"
    assert main([f"hf:{folder}", "--mlp", "0.25", "--method", "flap", "--refit", "ls", "--round-to", "1",
                 "--seq-len", "8", "--calib", str(folder / "calib.txt"), "--calib-samples", "24",
                 "-o", str(out), "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["verify"]["passed"] and data["verify"]["refit"]["applied"]
    assert data["verify"]["refit"]["rel_err_after"] < data["verify"]["refit"]["rel_err_before"]
    assert data["artifact"]["reload_from_pretrained_rel_err"] < 1e-5
    assert transformers.AutoConfig.from_pretrained(out).intermediate_size == 72
