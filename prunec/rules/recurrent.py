"""Recurrent layers: lstm, gru, rnn_tanh, rnn_relu (torch.export keeps nn.LSTM/GRU/RNN as one op
with a flat weight list: per layer and direction w_ih, w_hh[, b_ih, b_hh])."""
from __future__ import annotations

import numpy as np
from torch import fx

from prunec.coupling import CouplingBuilder, shape_of
from prunec.rules import arg, aten, coupling_rule, ndim, no_sizes

GATES = {aten.lstm.input: 4, aten.gru.input: 3, aten.rnn_tanh.input: 1, aten.rnn_relu.input: 1}


def _freeze_everything(node: fx.Node, g: CouplingBuilder, reason: str) -> None:
    for v in (*node.all_input_nodes, *node.users):
        g.freeze_all(v, reason)


@coupling_rule(*GATES, fix=no_sizes)
def recurrent(node: fx.Node, g: CouplingBuilder) -> None:
    """Hidden unit u of layer l, direction d owns rows g·H + u (every gate g) of w_ih, w_hh, b_ih,
    b_hh, column u of w_hh, feature d·H + u of the layer's output (so columns d·H + u of the next
    layer's w_ih) and index u of h0/c0/h_n/c_n. h0's one hidden dim ties unit u across all layers.
    Input feature i ↔ column i of layer 0's w_ih. Column sums are consumed: dropping is exact."""
    x, hx, params = arg(node, 0), arg(node, 1), arg(node, 2)
    has_biases, layers, bidirectional = arg(node, 3), arg(node, 4), arg(node, 7)
    batch_first = arg(node, 8)
    hx = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    dirs = 2 if bidirectional else 1
    stride = 4 if has_biases else 2
    if len(params) != layers * dirs * stride:
        _freeze_everything(node, g, "LSTM with proj_size has no rule")
        return
    if ndim(x) != 3:
        _freeze_everything(node, g, "unbatched recurrent input has no rule")
        return
    outs = {u.args[1]: u for u in node.users if u.op == "call_function" and len(u.args) == 2}
    hidden = shape_of(params[1])[1]
    gates = GATES[node.target]
    anchor = (params[1], 1)  # layer 0's w_hh columns: one per hidden unit
    u = np.arange(hidden)
    b_dim = 0 if batch_first else 1
    out = outs.get(0)
    g.tie((x, b_dim), (out, b_dim), *((h, 1) for h in hx))
    g.tie((x, 1 - b_dim), (out, 1 - b_dim))
    for state in (*hx, outs.get(1), outs.get(2)):
        if state is not None:
            g.freeze(state, 0, "layer × direction index")
            g.tie((state, 2), anchor)
            if state in outs.values():
                g.tie((state, 1), (x, b_dim))
    for d in range(dirs):
        g.tie_map((out, 2), anchor, d * hidden + u, u)
    for k in range(layers * dirs):
        w_ih, w_hh, *biases = params[k * stride:(k + 1) * stride]
        for rows in (w_ih, w_hh, *biases):
            for gate in range(gates):
                g.tie_map((rows, 0), anchor, gate * hidden + u, u)
        g.tie((w_hh, 1), anchor)
        g.consume(w_hh, 1)
        g.consume(w_ih, 1)
        if k < dirs:
            g.tie((w_ih, 1), (x, 2))
        else:
            for d in range(dirs):
                g.tie_map((w_ih, 1), anchor, d * hidden + u, u)


CELL_GATES = {aten.lstm_cell.default: 4, aten.gru_cell.default: 3, aten.rnn_tanh_cell.default: 1,
              aten.rnn_relu_cell.default: 1}


@coupling_rule(*CELL_GATES, fix=no_sizes)
def recurrent_cell(node: fx.Node, g: CouplingBuilder) -> None:
    """One step of nn.LSTMCell/GRUCell/RNNCell: hidden unit u owns rows g·H + u of w_ih, w_hh and
    the biases, column u of w_hh and index u of h, c and the new state(s); input feature i ↔
    column i of w_ih. Column sums are consumed: dropping is exact."""
    x, hx, w_ih, w_hh = arg(node, 0), arg(node, 1), arg(node, 2), arg(node, 3)
    biases = [arg(node, 4), arg(node, 5)]
    hx = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    outs = [node] if shape_of(node) is not None else list(node.users)
    hidden, gates = shape_of(w_hh)[1], CELL_GATES[node.target]
    anchor, u = (w_hh, 1), np.arange(hidden)
    batched = ndim(x) == 2
    for rows in (w_ih, w_hh, *biases):
        for gate in range(gates):
            g.tie_map((rows, 0), anchor, gate * hidden + u, u)
    for state in (*hx, *outs):
        g.tie((state, 1 if batched else 0), anchor)
        if batched:
            g.tie((state, 0), (x, 0))
    g.tie((x, 1 if batched else 0), (w_ih, 1))
    g.consume(w_ih, 1)
    g.consume(w_hh, 1)
