"""LoRA recovery: ``peft`` adapters on the pruned model's Linear layers, merged back into dense weights."""
from __future__ import annotations

from torch import nn

from prunec.errors import InputError, MissingDependency
from prunec.program_module import ProgramModule


def with_lora(model: nn.Module, rank: int) -> nn.Module:
    """``peft`` LoRA adapters (alpha = 2r) on every Linear whose weight is not shared (a tied
    LM head would change the embedding when merged)."""
    if isinstance(model, ProgramModule):
        raise InputError("LoRA needs the model's own class, but this pruned model is an exported "
                         "program (its class could not be synced)", "recover without lora=")
    try:
        import peft
    except ImportError:
        raise MissingDependency("peft", "recover") from None
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    targets = [name for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and owners.get(id(m.weight), 0) == 1]
    if not targets:
        raise InputError("LoRA found no Linear layer to adapt", "recover without lora=")
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)
    return peft.get_peft_model(model, config)


def merge_lora(model: nn.Module) -> nn.Module:
    return model.merge_and_unload()
