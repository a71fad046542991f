"""Chapter 02, optional: the adversarial loss that makes VAE reconstructions crisp.

A pixel loss alone rewards the average of all plausible images, which is blurry. The CompVis recipe (Esser et al.
2021, "Taming Transformers"; Rombach et al. 2022) adds a PatchGAN discriminator (Isola et al. 2017) that judges
overlapping patches as real or reconstructed, trained with the hinge loss, and weights its signal adaptively so it
never drowns the reconstruction loss. It is switched on only after `disc_start` steps, once reconstructions are
already reasonable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchDiscriminator(nn.Module):
    """pix2pix's N-layer PatchGAN: a stack of stride-2 4x4 convs; each output logit sees one patch of the input.

    With 3 layers each logit's receptive field is 70x70 pixels at full size; on 64x64 images it sees a large patch.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = width
        for i in range(1, num_layers + 1):
            out = width * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(channels, out, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))    # one logit per patch
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # the pix2pix initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)                                                # (B, 1, h', w') patch logits


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """The discriminator wants real logits >= 1 and fake logits <= -1; beyond that margin it stops pushing."""
    # L_D = 1/2 (E[max(0, 1 - D(x))] + E[max(0, 1 + D(x_hat))])
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: Tensor) -> Tensor:
    # L_G = -E[D(x_hat)]: the decoder is rewarded for reconstructions the discriminator scores as real
    return -logits_fake.mean()


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """Balance the two losses by the size of their gradients at the decoder's last layer (Esser et al. 2021, eq. 7).

    lambda = ||grad rec|| / (||grad L_G|| + delta): the GAN term is scaled to pull exactly as hard as the
    reconstruction term, whatever their raw magnitudes.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    # lambda = ||grad_L rec|| / (||grad_L G|| + 1e-4), clamped
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
