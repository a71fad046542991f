"""Chapter 06: the exponential moving average of the weights, the model we sample from and ship."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """theta_ema <- d theta_ema + (1 - d) theta after every step, with d = min(decay, (1 + n) / (10 + n)).

    The ramp (from Keras / the LDM code) lets the average forget the random initial weights quickly; later the
    average over the last ~1 / (1 - decay) steps smooths out the noise of single SGD steps.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for name, value in model.state_dict().items():
            # theta_ema = d theta_ema + (1 - d) theta
            self.shadow[name].lerp_(value.detach().float(), 1 - d)

    def copy_to(self, model: nn.Module) -> nn.Module:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})
        return model
