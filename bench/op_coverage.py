"""Op coverage: trace a corpus, count the op occurrences that have a coupling rule, rank the ops
without one by how many models they block, and give per model the share of MACs that is prunable
(the node or one of its operands has a dim in some group).

    python bench/op_coverage.py [--only torchvision,timm,...] [--resume] [--limit 150]

Models are built on the meta device where possible (shapes only: no weights, no compute), so the
sweep measures the compiler's coverage, not the host. Results: bench/results/op_coverage.json and
the `opcov` section of docs/coverage.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import TIMM_CNNS, Timeout, time_limit, write_section  # noqa: E402
from prunec.analyze import build_coupling  # noqa: E402
from prunec.rules import rule_for  # noqa: E402
from prunec.trace import trace  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "op_coverage.json"
DOC = ROOT / "docs" / "coverage.md"
BEGIN, END = "<!-- opcov:begin -->", "<!-- opcov:end -->"
warnings.filterwarnings("ignore")

Build = Callable[[], tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]]

TIMM = TIMM_CNNS + """
vit_tiny_patch16_224 deit_tiny_patch16_224 swin_tiny_patch4_window7_224 swinv2_cr_tiny_224 convit_tiny
levit_128s pit_ti_224 mvitv2_tiny coat_lite_tiny twins_svt_small poolformer_s12 mixer_s16_224
resmlp_12_224 gmlp_ti16_224 eva02_tiny_patch14_224 cait_xxs24_224 xcit_nano_12_p16_224
efficientformer_l1 efficientformerv2_s0 tiny_vit_5m_224 mobilevitv2_050 sequencer2d_s volo_d1_224
visformer_tiny tnt_s_patch16_224 davit_tiny focalnet_tiny_srf hiera_tiny_224 coatnet_0_rw_224
inception_next_tiny caformer_s18 nextvit_small maxvit_tiny_tf_224 pvt_v2_b0 crossvit_tiny_240
beit_base_patch16_224 deit3_small_patch16_224 flexivit_small vit_small_patch16_rope_224 gcvit_xxtiny
""".split()
HF = ("bert", "gpt2", "llama", "qwen2", "mistral")


# ----------------------------------------------------------------------------- corpus
def _tv(module: Any, name: str, shape: tuple[int, ...], **kw: Any) -> Build:
    def build() -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
        import torchvision
        return torchvision.models.get_model(name, weights=None, **kw), (torch.randn(*shape),), {}
    return build


def torchvision_corpus() -> Iterator[tuple[str, str, Build, bool]]:
    import torchvision.models as tvm
    for name in tvm.list_models(module=tvm):
        yield "torchvision", name, _tv(tvm, name, (1, 3, 299 if name == "inception_v3" else 224) + (
            (299,) if name == "inception_v3" else (224,))), True
    for name in tvm.list_models(module=tvm.segmentation):
        yield "tv-segmentation", name, _tv(tvm.segmentation, name, (1, 3, 224, 224), weights_backbone=None,
                                           aux_loss=False), True
    for name in tvm.list_models(module=tvm.video):
        small = name in ("r3d_18", "mc3_18", "r2plus1d_18")
        shape = (1, 3, 8, 112, 112) if small else (1, 3, 16, 224, 224)
        yield "tv-video", name, _tv(tvm.video, name, shape), True
    for name in tvm.list_models(module=tvm.optical_flow):
        def raft(name: str = name) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
            import torchvision
            model = torchvision.models.get_model(name, weights=None)
            x = torch.randn(1, 3, 128, 128)
            return model, (x, x.clone()), {"num_flow_updates": 2}
        yield "tv-optical-flow", name, raft, False
    for name in tvm.list_models(module=tvm.detection):
        for part in ("backbone", "head"):
            yield "tv-detection-part", f"{name}.{part}", _detection_part(name, part), True


def _detection_part(name: str, part: str) -> Build:
    def build() -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
        import torchvision
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None).eval()
        size = 320 if "ssd" in name else 224
        x = torch.randn(1, 3, size, size)
        if part == "backbone":
            return model.backbone, (x,), {}
        with torch.no_grad():
            feats = model.backbone(x)
        feats = list(feats.values()) if isinstance(feats, dict) else list(feats)
        if hasattr(model, "rpn"):  # two-stage: the RoI box head on pooled features
            c = feats[0].shape[1]
            box = torch.nn.Sequential(model.roi_heads.box_head, _First(model.roi_heads.box_predictor))
            return box, (torch.randn(8, c, 7, 7),), {}
        return _ListHead(model.head), tuple(feats), {}
    return build


class _First(torch.nn.Module):
    """A predictor returning (scores, boxes) → their concatenation (one tensor output)."""

    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.m(x)
        return torch.cat([a, b], dim=1)


class _ListHead(torch.nn.Module):
    """A detection head taking a list of feature maps, called with them as positional inputs."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, *feats: torch.Tensor) -> Any:
        return self.head(list(feats))


def timm_corpus() -> Iterator[tuple[str, str, Build, bool]]:
    import timm
    known = set(timm.list_models())
    for name in TIMM:
        if name not in known:
            continue

        def build(name: str = name) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
            model = timm.create_model(name, pretrained=False)
            cfg = getattr(model, "pretrained_cfg", None) or {}
            size = (cfg.get("input_size") or (3, 224, 224))[-1]
            return model, (torch.randn(1, 3, size, size),), {}
        yield "timm", name, build, True


def hf_corpus() -> Iterator[tuple[str, str, Build, bool]]:
    from tests.test_transformers import build
    for kind in HF:
        yield "hf", kind, lambda kind=kind: build(kind), False


def layers_corpus() -> Iterator[tuple[str, str, Build, bool]]:
    from tests.test_rules_layers import CASES
    for case in CASES:
        yield "layers", case.name, lambda case=case: (case.model(), (torch.randn(*case.shape),), {}), False


def tp_corpus() -> Iterator[tuple[str, str, Build, bool]]:
    from tests.test_tp_models import TP_MODELS
    for case in TP_MODELS:
        yield "torch-pruning tests", case.name, lambda case=case: (case.model(), case.inputs(), {}), False


def ultralytics_corpus() -> Iterator[tuple[str, str, Build, bool]]:
    try:
        from ultralytics import YOLO
    except ImportError:
        return
    for cfg in ("yolov8n.yaml", "yolo11n.yaml", "yolov8n-seg.yaml"):
        def build(cfg: str = cfg) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
            model = YOLO(cfg).model.eval()
            return model, (torch.randn(1, 3, 256, 256),), {}
        yield "ultralytics", cfg.removesuffix(".yaml"), build, False


def diffusers_corpus() -> Iterator[tuple[str, str, Build, bool]]:
    try:
        import diffusers
    except ImportError:
        return

    def unet2d() -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
        model = diffusers.UNet2DModel(sample_size=32, block_out_channels=(32, 64), layers_per_block=1,
                                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
        return model, (torch.randn(1, 3, 32, 32), torch.tensor([10])), {}

    def unet2d_cond() -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]:
        model = diffusers.UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            norm_num_groups=8, attention_head_dim=8)
        return model, (torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 5, 32)), {}
    yield "diffusers", "UNet2DModel", unet2d, False
    yield "diffusers", "UNet2DConditionModel", unet2d_cond, False


CORPORA = {"torchvision": torchvision_corpus, "timm": timm_corpus, "hf": hf_corpus, "layers": layers_corpus,
           "tp": tp_corpus, "ultralytics": ultralytics_corpus, "diffusers": diffusers_corpus}


# ----------------------------------------------------------------------------- measure


def _to_meta(value: Any) -> Any:
    return torch.utils._pytree.tree_map(
        lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, value)


def node_macs(program: Any) -> dict[str, int]:
    """MACs of every call_function node (FlopCounterMode per node, on the program's own tensors)."""
    gm = program.ep.module()

    class PerNode(fx.Interpreter):
        macs: dict[str, int] = {}

        def run_node(self, n: fx.Node) -> Any:
            with FlopCounterMode(display=False) as counter:
                out = super().run_node(n)
            if n.op == "call_function":
                self.macs[n.name] = counter.get_total_flops() // 2
            return out

    interp = PerNode(gm)
    interp.macs = {}
    flat, _ = torch.utils._pytree.tree_flatten((program.example_inputs, program.example_kwargs))
    n_in = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    with torch.no_grad():
        interp.run(*flat[:n_in])
    return interp.macs


def measure(build: Build, meta: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    if meta:
        with torch.device("meta"):
            model, inputs, kwargs = build()
        inputs, kwargs = _to_meta(inputs), _to_meta(kwargs)
    else:
        torch.manual_seed(0)
        model, inputs, kwargs = build()
    model = model.eval()
    program = trace(model, inputs, kwargs)
    t_trace = time.perf_counter() - t0
    coupling = build_coupling(program)
    ops = Counter()
    missing = Counter()
    for n in program.graph.nodes:
        if n.op == "call_function":
            ops[str(n.target)] += 1
            if rule_for(n) is None:
                missing[str(n.target)] += 1
    grouped = np.zeros(int(coupling.labels.max()) + 1 if len(coupling.labels) else 0, bool)
    exact = grouped.copy()
    for g in coupling.groups:
        grouped[g.labels] = True
        if not g.approximate:
            exact[g.labels] = True
    key_index = {k: i for i, k in enumerate(coupling.keys)}

    def touches(node: fx.Node, mask: np.ndarray) -> bool:
        for v in (node, *node.all_input_nodes):
            for (kn, d), i in ((k, key_index[k]) for k in _keys_of(v, key_index)):
                lo = coupling.starts[i]
                hi = coupling.starts[i + 1] if i + 1 < len(coupling.starts) else len(coupling.labels)
                if mask[coupling.labels[lo:hi]].any():
                    return True
        return False

    macs = node_macs(program)
    total = sum(macs.values())
    names = {n.name: n for n in program.graph.nodes}
    prunable = sum(m for name, m in macs.items() if m and name in names and touches(names[name], grouped))
    exact_macs = sum(m for name, m in macs.items() if m and name in names and touches(names[name], exact))
    return {"ops": dict(ops), "missing": dict(missing), "macs": int(total),
            "prunable_macs": int(prunable), "exact_macs": int(exact_macs),
            "groups": len(coupling.groups), "trace_s": round(t_trace, 1),
            "total_s": round(time.perf_counter() - t0, 1), "meta": meta}


def _has_rule(op_name: str) -> bool:
    """Whether an op recorded as 'aten.name.overload' has a rule now."""
    parts = op_name.split(".")
    if len(parts) != 3 or parts[0] != "aten":
        return False
    packet = getattr(torch.ops.aten, parts[1], None)
    op = getattr(packet, parts[2], None) if packet is not None else None
    return op is not None and rule_for(fx.Graph().call_function(op)) is not None


def _keys_of(node: fx.Node, key_index: dict[Any, int]) -> list[Any]:
    out = []
    d = 0
    while (node, d) in key_index:
        out.append((node, d))
        d += 1
    return out


# ----------------------------------------------------------------------------- report
def load(path: Path = RESULTS) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"models": {}}


def save(data: dict[str, Any], path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def load_all() -> dict[str, Any]:
    """Every results file (a sweep split over processes writes op_coverage*.json), merged."""
    data: dict[str, Any] = {"models": {}}
    for path in sorted(RESULTS.parent.glob("op_coverage*.json")):
        part = load(path)
        data["models"].update(part["models"])
        data["when"] = max(data.get("when", ""), part.get("when", ""))
        data["load"] = max(data.get("load", 0.0), part.get("load", 0.0))
    return data


def write_doc(data: dict[str, Any], command: str) -> None:
    rows = data["models"]
    for r in rows.values():  # ops recorded missing that have a rule now count as covered
        if "missing" in r:
            r["missing"] = {op: c for op, c in r["missing"].items() if not _has_rule(op)}
    ok = {k: r for k, r in rows.items() if "error" not in r}
    occ = sum(sum(r["ops"].values()) for r in ok.values())
    miss = sum(sum(r["missing"].values()) for r in ok.values())
    blocks: dict[str, set[str]] = defaultdict(set)
    counts: Counter = Counter()
    for key, r in ok.items():
        for op, c in r["missing"].items():
            blocks[op].add(key)
            counts[op] += c
    by_group: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for key, r in sorted(rows.items()):
        by_group[r["group"]].append((key.split("/", 1)[1], r))
    lines = [BEGIN, "## Op coverage (bench/op_coverage.py)", "",
             f"Command: `{command}`  ",
             f"Last model measured: {data.get('when', '?')}; highest 1-min load average seen: {data.get('load', '?')} "
             "on 2 shared cores (times are under that contention).  ",
             "Models are traced with `torch.export` (on the meta device where the model allows: shapes only), "
             "analysed by the rule table, and each call_function node's MACs counted with `FlopCounterMode`. "
             "*prunable MACs* = MACs of nodes that have (or whose operands have) a dim in some group; "
             "*exact* = in a group that is not approximate (what `--channels/--heads` cut). "
             "Coverage counts use the rule table as it is now; a model measured before an op it uses gained "
             "a rule (copy_/zero_, meshgrid, item were added during the sweep) keeps its older MAC shares. "
             "The sweep was stopped at the session deadline: models not listed were not reached.", "",
             f"**{len(ok)} models traced** ({len(rows) - len(ok)} failed to build or trace, listed below); "
             f"**{occ:,} op occurrences, {occ - miss:,} with a rule = {100 * (occ - miss) / max(occ, 1):.2f} %**.", ""]
    lines += ["### Ops without a rule, ranked by models blocked", "",
              "| op | models | occurrences | e.g. |", "|---|---|---|---|"]
    for op, models in sorted(blocks.items(), key=lambda kv: (-len(kv[1]), -counts[kv[0]])):
        lines.append(f"| `{op}` | {len(models)} | {counts[op]} | {', '.join(sorted(models)[:3])} |")
    if not blocks:
        lines.append("| (none) | | | |")
    lines += ["", "### Per group", "", "| group | models | op occurrences | with rule | median prunable MACs | "
              "median exact MACs |", "|---|---|---|---|---|---|"]
    for group, items in by_group.items():
        good = [r for _, r in items if "error" not in r]
        o = sum(sum(r["ops"].values()) for r in good)
        m = sum(sum(r["missing"].values()) for r in good)
        share = [r["prunable_macs"] / r["macs"] for r in good if r["macs"]]
        ex = [r["exact_macs"] / r["macs"] for r in good if r["macs"]]
        lines.append(f"| {group} | {len(good)}/{len(items)} | {o:,} | {100 * (o - m) / max(o, 1):.2f} % | "
                     f"{100 * float(np.median(share)) if share else float('nan'):.0f} % | "
                     f"{100 * float(np.median(ex)) if ex else float('nan'):.0f} % |")
    lines += ["", "### Per model", "", "| group | model | ops | without rule | GMACs | prunable MACs | exact MACs | "
              "groups | s |", "|---|---|---|---|---|---|---|---|---|"]
    for group, items in by_group.items():
        for name, r in items:
            if "error" in r:
                lines.append(f"| {group} | `{name}` | ✗ {r['error'][:120]} | | | | | | |")
                continue
            o, m = sum(r["ops"].values()), sum(r["missing"].values())
            share = f"{100 * r['prunable_macs'] / r['macs']:.0f} %" if r["macs"] else "–"
            ex = f"{100 * r['exact_macs'] / r['macs']:.0f} %" if r["macs"] else "–"
            miss_ops = ", ".join(f"`{k.removeprefix('aten.')}`" for k in r["missing"]) or "–"
            lines.append(f"| {group} | `{name}` | {o} | {m} ({miss_ops}) | {r['macs'] / 1e9:.3g} | {share} | {ex} | "
                         f"{r['groups']} | {r['total_s']} |")
    lines.append(END)
    write_section(DOC, BEGIN, END, lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(CORPORA), help="comma-separated corpora")
    ap.add_argument("--resume", action="store_true", help="skip models already in the results")
    ap.add_argument("--limit", type=int, default=150, help="seconds per model")
    ap.add_argument("--doc-only", action="store_true", help="rewrite the doc from the saved results")
    ap.add_argument("--results", default=str(RESULTS), help="results file (several may run in parallel)")
    ap.add_argument("--reverse", action="store_true", help="walk each corpus from its end (a second process)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = Path(args.results)
    data = load(results)
    if not args.doc_only:
        for corpus in args.only.split(","):
            items = list(CORPORA[corpus]())
            for group, name, build, meta in reversed(items) if args.reverse else items:
                key = f"{corpus}/{group}:{name}"
                old = data["models"].get(key) or load_all()["models"].get(key)  # another process may have it
                if args.resume and old and "error" not in old and not any(_has_rule(op) for op in old["missing"]):
                    continue  # done, and no op it lacked has gained a rule since
                try:
                    with time_limit(args.limit):
                        try:
                            row = measure(build, meta)
                        except Timeout:
                            raise
                        except Exception:
                            if not meta:
                                raise
                            row = measure(build, False)  # data-dependent code needs real tensors
                except Exception as err:  # record and go on: one model never stops the sweep
                    text = str(err).strip()
                    row = {"error": f"{type(err).__name__}: {text.splitlines()[0][:200] if text else ''}"}
                row["group"] = group
                data["models"][key] = row
                print(key, {k: v for k, v in row.items() if k not in ("ops",)}, flush=True)
                data["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                data["load"] = max(data.get("load", 0.0), os.getloadavg()[0])
                save(data, results)
    write_doc(load_all(), "python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
