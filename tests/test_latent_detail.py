"""benchmarks/latent_detail.py: the share of a latent's energy that a 2x average pool loses (chapter 06)."""

from __future__ import annotations

import json

import pytest
import torch
from benchscript import load_benchmark

latent_detail_script = load_benchmark("latent_detail")
latent_detail = latent_detail_script.latent_detail


def test_a_latent_constant_over_each_2x2_block_loses_nothing():
    torch.manual_seed(0)
    coarse = torch.randn(3, 4, 4, 4)                                         # (N, C, 4, 4)
    z = coarse.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)       # (N, C, 8, 8): constant 2x2 blocks
    assert latent_detail(z) == pytest.approx(0.0, abs=1e-6)


def test_a_checkerboard_is_all_detail_and_a_per_channel_offset_is_ignored():
    checker = (torch.arange(8).view(8, 1) + torch.arange(8).view(1, 8)) % 2 * 2.0 - 1.0   # (8, 8): +-1
    z = checker.expand(2, 4, 8, 8) + torch.tensor([5.0, -3.0, 0.0, 1.0]).view(1, 4, 1, 1)
    assert latent_detail(z) == pytest.approx(1.0, abs=1e-6)


def test_the_share_is_the_fine_energy_over_the_whole():
    torch.manual_seed(1)
    coarse = torch.randn(2, 1, 2, 2).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)   # (2, 1, 4, 4)
    fine = torch.randn(2, 1, 4, 4)
    fine = fine - torch.nn.functional.avg_pool2d(fine, 2).repeat_interleave(2, 2).repeat_interleave(2, 3)
    z = coarse + fine
    z = z - z.mean(dim=(0, 2, 3), keepdim=True)
    # the two parts are orthogonal, so the energies add: lost / total = |fine|^2 / (|coarse - mean|^2 + |fine|^2)
    expected = fine.pow(2).sum() / z.pow(2).sum()
    assert latent_detail(z) == pytest.approx(expected.item(), rel=1e-5)


def test_a_record_whose_vae_is_not_here_is_refused_in_one_line(tmp_path):
    record = tmp_path / "ldm-on-vae-gone.json"
    record.write_text(json.dumps({"vae": str(tmp_path / "gone"), "steps": 7000, "prompt_following": 0.5,
                                  "unet": {"attention_levels": [False, True]}}))
    with pytest.raises(SystemExit, match="which is not here: train it again"):
        latent_detail_script.main([str(record)])
