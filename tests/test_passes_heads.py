"""Head importance (Michel et al. 2019) and movement (Sanh et al. 2020) criteria.

* HeadImportance's score is the gradient of a real gate on each head's output (checked against
  forward-pre-hook gates on BERT's output projection), compiles to a verified exact plan, scores
  only head groups, and keeps the one head that matters where L1 magnitude drops it.
* Movement compiles and verifies on the zoo convbn, differs from L1, leaves the model untouched.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import prunec
from prunec.analyze import build_coupling
from prunec.calib import _loss
from prunec.models_zoo import build
from prunec.passes import HeadImportance, L1, Movement, Select
from prunec.passes.base import State, param_members, run_passes
from prunec.passes.movement import signed_unit_scores
from prunec.passes.taylor import slice_sum
from prunec.trace import trace

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore")
torch.set_num_threads(2)
SEQ, HEADS, HEAD_DIM = 12, 4, 16


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=64, num_attention_heads=HEADS,
                                  intermediate_size=128, num_hidden_layers=2,
                                  max_position_embeddings=64, attn_implementation="sdpa")
    cfg._attn_implementation = "sdpa"
    return transformers.BertModel(cfg).eval()


def _inputs(seed: int, batch: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 96, (batch, SEQ), generator=gen),
            "attention_mask": torch.ones(batch, SEQ, dtype=torch.long)}


def _plant(model: torch.nn.Module, keep: int = 0) -> None:
    """Only head ``keep`` of every layer produces output. The other heads have *large* weights,
    but their value rows are constant: every attention input is a LayerNorm output with default
    affine (weight 1, bias 0), which sums to 0 over the hidden dim, so W_v x = 0 for them."""
    with torch.no_grad():
        for layer in model.encoder.layer:
            att = layer.attention
            for lin in (att.self.query, att.self.key, att.self.value):
                lin.bias.zero_()
            for h in range(HEADS):
                rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                if h == keep:
                    for lin in (att.self.query, att.self.key, att.self.value):
                        lin.weight[rows] *= 0.5
                    att.output.dense.weight[:, rows] *= 0.5
                else:
                    att.self.value.weight[rows] = 1.0
                    for lin in (att.self.query, att.self.key):
                        lin.weight[rows] *= 4
                    att.output.dense.weight[:, rows] *= 4


def test_head_importance_is_the_gate_gradient():
    model, batch = _bert(), _inputs(1)
    program = trace(model, (), batch)
    coupling = build_coupling(program)
    state = run_passes([HeadImportance(calib=[batch], per_example=False, normalize=False)],
                       State(model, program, coupling))
    head_groups = [g.name for g in coupling.groups if g.kind == "head"]
    assert sorted(state.scores) == sorted(head_groups) and len(head_groups) == 2
    gates = [torch.ones(HEADS, requires_grad=True) for _ in model.encoder.layer]
    hooks = [layer.attention.output.dense.register_forward_pre_hook(
        lambda mod, args, g=g: (args[0] * g.repeat_interleave(HEAD_DIM),))
        for layer, g in zip(model.encoder.layer, gates)]
    try:
        _loss(model(**batch), None).backward()
    finally:
        for h in hooks:
            h.remove()
    for layer, g in enumerate(gates):
        name = next(n for n in head_groups if f"layer.{layer}." in n)
        np.testing.assert_allclose(state.scores[name], g.grad.abs().double().numpy(), rtol=1e-4)
    # normalised per layer: unit L2 norm across heads
    state = run_passes([HeadImportance(calib=[batch, _inputs(2)])], State(model, program, coupling))
    for name in head_groups:
        assert np.linalg.norm(state.scores[name]) == pytest.approx(1.0)


def test_head_importance_keeps_the_only_useful_head():
    model = _bert()
    _plant(model, keep=0)
    example = _inputs(0)
    calib = [_inputs(10 + i) for i in range(3)]
    michel = prunec.compile(model, (), example_kwargs=example,
                            passes=[HeadImportance(calib=calib), Select({"head": 0.5})])
    l1 = prunec.compile(model, (), example_kwargs=example, passes=[L1(), Select({"head": 0.5})])
    for r in (michel, l1):
        assert r.report["verify"]["passed"] and r.report["verify"]["exact"]
        assert len(r.plan.kept) == 2 and all(len(k) == 2 for k in r.plan.kept.values())
    assert all(0 in kept for kept in michel.plan.kept.values())
    assert all(0 not in kept for kept in l1.plan.kept.values())
    assert michel.plan.kept != l1.plan.kept
    # the dropped heads were dead: Michel's pruned model is the dense one, magnitude's is not
    batch = _inputs(99)
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        err = {n: float((r.model(**batch)[0] - ref).norm() / ref.norm()) for n, r in
               (("michel", michel), ("l1", l1))}
    assert err["michel"] < 1e-5 and err["l1"] > 100 * err["michel"]


def test_head_importance_needs_calibration():
    model = _bert()
    with pytest.raises(prunec.errors.InputError, match="needs calibration data"):
        prunec.compile(model, (), example_kwargs=_inputs(0),
                       passes=[HeadImportance(), Select({"head": 0.5})])


def test_movement_on_convbn_verifies_differs_from_l1_and_leaves_model_alone():
    model, inputs = build("convbn")
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(2, 1, 28, 28, generator=gen),) for _ in range(3)]
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    move = prunec.compile(model, inputs, calib=calib,
                          passes=[Movement(steps=6, lr=1e-2), Select({"channel": 0.5})])
    l1 = prunec.compile(model, inputs, passes=[L1(), Select({"channel": 0.5})])
    assert move.report["verify"]["passed"]
    assert {n: len(k) for n, k in move.plan.kept.items()} == {n: len(k) for n, k in l1.plan.kept.items()}
    assert move.plan.kept != l1.plan.kept
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_movement_one_step_is_minus_w_times_grad():
    """One step: S = −W·g at the dense weights, aggregated like the other criteria; more steps
    (with SGD updates of the parameter copy) give different scores."""
    model, inputs = build("convbn")
    program = trace(model, inputs, {})
    coupling = build_coupling(program)
    state = State(model, program, coupling)
    one = run_passes([Movement(calib=[inputs], steps=1)], state).scores
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    loss = _loss(torch.func.functional_call(model, params, inputs), None)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    for group in coupling.groups:
        members = param_members(state, group.name)
        elems = [slice_sum(-(params[f].detach().double() * grads[f].double()), d).numpy() for f, d, _ in members]
        expected = signed_unit_scores(elems, [r for *_, r in members])
        np.testing.assert_allclose(one[group.name], expected, rtol=1e-6, atol=1e-12)
    three = run_passes([Movement(calib=[inputs], steps=3, lr=0.1)], State(model, program, coupling)).scores
    assert any(not np.allclose(one[n], three[n]) for n in one)
