"""VAE files against diffusers: a diffusers `vae/` folder swaps in and decodes as diffusers does, and the writers in
tests/test_vae_files.py produce the layouts diffusers itself reads (so those tests test the real layouts)."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tests.test_pipeline import tiny_pipe  # noqa: E402
from tests.test_vae_files import latents, source_vae, to_compvis, to_diffusers  # noqa: E402
from tests.weights import randomise_norms  # noqa: E402

pytestmark = [pytest.mark.oracle, pytest.mark.usefixtures("one_thread")]
ATOL = 1e-5


def reference_vae(seed: int = 3):
    """diffusers' AutoencoderKL with tiny_pipe's VAE architecture and random weights, GroupNorms randomised too."""
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                    layers_per_block=1, norm_num_groups=4).eval()
    return randomise_norms(model)


def test_diffusers_vae_folder_swaps_in_and_decodes_as_diffusers(tmp_path):
    reference = reference_vae()
    reference.save_pretrained(tmp_path / "vae", safe_serialization=True)
    pipe = tiny_pipe()
    pipe.swap_vae(tmp_path / "vae")
    with torch.no_grad():
        ours, theirs = pipe.vae.decode(latents()), reference.decode(latents()).sample
    assert (ours - theirs).abs().max().item() < ATOL


def test_the_tests_diffusers_writer_is_the_layout_diffusers_loads():
    source = source_vae()
    reference = reference_vae()
    reference.load_state_dict(to_diffusers(source.state_dict()), strict=True)
    with torch.no_grad():
        assert (source.decode(latents()) - reference.decode(latents()).sample).abs().max().item() < ATOL


def test_the_tests_compvis_writer_is_what_diffusers_single_file_converter_reads_back_exactly():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    source = source_vae()
    expected = to_diffusers(source.state_dict())
    back = convert_ldm_vae_checkpoint(to_compvis(source.state_dict(), "first_stage_model."),
                                      dict(reference_vae().config))
    assert sorted(back) == sorted(expected), f"keys differ: {sorted(set(back) ^ set(expected))[:5]}"
    for key in expected:
        assert torch.equal(back[key], expected[key]), f"diffusers reads {key} differently"
