import os
import socket
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def corrupt_rewriter(monkeypatch, fqn: str) -> None:
    """Make the rewriter scramble ``fqn``'s input columns after slicing: the verifier must catch it."""
    from prunec import rewrite as rw

    original = rw.slice_state

    def broken(cut, *args, **kwargs):
        state = original(cut, *args, **kwargs)
        state[fqn] = torch.roll(state[fqn], 1, dims=1)
        return state

    monkeypatch.setattr(rw, "slice_state", broken)


def assert_verified(result, tol: float = 1e-4) -> None:
    """The compile's own verifier passed, exactly, within ``tol``."""
    v = result.report["verify"]
    assert v["passed"] and v["exact"], v
    assert v["rel_err"] <= tol, v


TEXT = ("The quick brown fox jumps over the lazy dog. Pruning removes whole channels and heads. "
        "A smaller dense model runs faster on real hardware. ") * 40


def make_hf_llama(folder, heads: int = 4, kv_heads: int = 2, hidden: int = 64, layers: int = 2):
    """A tiny random Llama with a real (word-level, trained here) fast tokenizer, saved to ``folder``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=96,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads, max_position_embeddings=128,
                                   bos_token_id=2, eos_token_id=3, pad_token_id=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    (folder / "calib.txt").write_text(TEXT)
    return folder


def free_port() -> int:
    """A free local TCP port for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    """This spawned process as ``rank`` of a local gloo group (one thread), destroyed on exit."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
