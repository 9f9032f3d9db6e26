"""Block-by-block compile of sharded hf: decoder checkpoints (prunec.blockwise) against the whole-model path."""
import json
import shutil

import pytest
import torch
import transformers

import prunec
from prunec.blockwise import compile_blockwise
from prunec.cli import main
from conftest import TEXT, make_hf_llama


def _shard(folder, model) -> None:
    """Re-save ``model`` into ``folder`` as several safetensors shards + index (the big-checkpoint layout)."""
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    model.save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()


@pytest.fixture
def llama(tmp_path):
    folder = make_hf_llama(tmp_path / "llama", heads=4, kv_heads=2, hidden=64, layers=3)
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    _shard(folder, model)
    return folder, model


@pytest.fixture
def qwen2(tmp_path):
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # Qwen2 q/k/v carry biases: make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    folder = tmp_path / "qwen2"
    _shard(folder, model)
    return folder, model


def _whole(model, heads, mlp, **kw):
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    return prunec.compile(model, (), example_kwargs={"input_ids": ids, "use_cache": False}, heads=heads, mlp=mlp,
                          static=True, **kw)


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_blockwise_equals_whole_model_compile(which, request, tmp_path):
    folder, model = request.getfixturevalue(which)
    report = compile_blockwise(folder, tmp_path / "out", heads=0.5, mlp=0.25, seq_len=12)
    whole = _whole(model, 0.5, 0.25)
    plan = {f"model.layers.{b['block']}.{n}": k for b in report["blocks"] for n, k in b["plan"].items()}
    assert plan == {n: list(k) for n, k in whole.plan.kept.items()}   # same units kept, block by block
    assert all(b["verify"]["passed"] and b["verify"]["rel_err"] <= 1e-4 for b in report["blocks"])
    assert report["config"] == {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 72}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        got, want = reloaded(input_ids=ids).logits, whole.model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * want.abs().max())
    assert reloaded.generate(ids[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False).shape == (1, 14)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in whole.model.parameters())


def test_cli_blockwise_writes_a_from_pretrained_folder(llama, tmp_path, capsys):
    folder, _ = llama
    out, rep = tmp_path / "pruned", tmp_path / "r.json"
    assert main([f"hf:{folder}", "--heads", "0.5", "--mlp", "0.25", "-o", str(out), "--blockwise",
                 "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    assert text.count("verify PASSED") == 3 and "peak RSS" in text
    report = json.loads(rep.read_text())
    assert report["peak_rss_mb"] >= report["rss_at_start_mb"] > 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 + 3   # a shard per block + embed, norm, lm_head
    assert (out / "tokenizer.json").is_file()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = tok("The quick brown fox", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_sequential_calibration_block0_matches_whole_model(llama, tmp_path):
    """wanda on calibration text: block 0 sees the same embeddings as the whole-model path, so it keeps the
    same units; later blocks are scored on the already-pruned blocks' outputs."""
    folder, model = llama
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    stream = tok(TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    batches = [stream[i * 12:(i + 1) * 12][None] for i in range(4)]
    report = compile_blockwise(folder, tmp_path / "out", mlp=0.25, method="wanda", calib=batches, seq_len=12)
    whole = prunec.compile(model, (), example_kwargs={"input_ids": batches[0], "use_cache": False}, mlp=0.25,
                           method="wanda", calib=[{"input_ids": b, "use_cache": False} for b in batches], static=True)
    name = "mlp.gate_proj.weight@0"
    assert report["blocks"][0]["plan"][name] == list(whole.plan.kept[f"model.layers.0.{name}"])
    l1 = compile_blockwise(folder, tmp_path / "out_l1", mlp=0.25)
    assert report["blocks"][0]["plan"][name] != l1["blocks"][0]["plan"][name]   # the data changed the choice
    assert report["calib_batches"] == 4


def _bert(folder):
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=48)
    transformers.BertModel(cfg).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", ["bert", "hidden", "pt2", "no_safetensors", "ids_past_vocab"])
def test_blockwise_bad_input_is_one_line_exit_2(case, llama, tmp_path, capsys):
    folder, model = llama
    args = ["--heads", "0.5", "-o", str(tmp_path / "out"), "--blockwise"]
    if case == "bert":
        folder = _bert(tmp_path / "bert")
    elif case == "hidden":
        args += ["--hidden", "0.25"]
    elif case == "pt2":
        args[3] = str(tmp_path / "out.pt2")
    elif case == "ids_past_vocab":   # token ids as --calib, checked against the config's vocabulary
        import numpy as np
        np.save(tmp_path / "ids.npy", np.full((4, 32), 10 ** 6, np.int64))
        args += ["--method", "flap", "--calib", str(tmp_path / "ids.npy")]
    else:
        bare = tmp_path / "bare"
        shutil.copytree(folder, bare)
        for f in bare.glob("model*.safetensors*"):
            f.unlink()
        torch.save(model.state_dict(), bare / "pytorch_model.bin")
        folder = bare
    capsys.readouterr()  # drop the fixtures' progress bars
    assert main([f"hf:{folder}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunec: error:") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.pt2").exists()


def test_cli_picks_blockwise_for_a_checkpoint_over_a_quarter_of_ram(llama, tmp_path, capsys, monkeypatch):
    import os
    folder, _ = llama
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 10 if name == "SC_PHYS_PAGES" else real(name))
    assert main([f"hf:{folder}", "--mlp", "0.25", "-o", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.count("verify PASSED") == 3   # one line per block: the blockwise path ran


def test_calibration_windows_of_another_length_are_refused(llama, tmp_path):
    folder, _ = llama
    with pytest.raises(prunec.InputError, match="must be 12 long"):
        compile_blockwise(folder, tmp_path / "out", mlp=0.25, method="wanda", calib=[torch.zeros(2, 5)], seq_len=12)
    assert not (tmp_path / "out").exists()
