"""Test weights that hide nothing: shared by the parity and weight-file tests."""

import torch


def randomise_norms(model: torch.nn.Module, spread: float = 0.2) -> torch.nn.Module:
    """Norm scales around 1 and shifts around 0, not exactly 1 and 0: a norm mapped to the wrong place, or not
    loaded at all, then changes the output instead of hiding at its default."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and module.weight is not None:
                module.weight.normal_(1.0, spread)
                module.bias.normal_(0.0, spread)
    return model
