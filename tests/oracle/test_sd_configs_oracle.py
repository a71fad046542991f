"""The dicts of minildm/sd_configs.py build, in diffusers and transformers, models with exactly our parameter counts
and tensor counts: diffusers' UNet2DConditionModel and AutoencoderKL and transformers' CLIPTextModel, all on the
meta device (shapes only, no memory). So the counts the chapter prints are the released models' counts."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from minildm.sd_configs import SDXL, build_on_meta, count_parameters, reference_models  # noqa: E402

pytestmark = pytest.mark.oracle

PARTS = ("unet", "vae", "text_encoder")


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_diffusers_and_transformers_models_from_the_same_dicts_have_our_parameter_and_tensor_counts(name):
    theirs = reference_models(name)
    for part, ours in zip(PARTS, build_on_meta(name)):
        mine, reference = count_parameters(ours), count_parameters(theirs[part])
        assert mine == reference, f"{name} {part}: ours has {mine:,} parameters, the reference {reference:,}"
        keys = {k for k in theirs[part].state_dict() if not k.endswith("position_ids")}   # a buffer we make in forward
        assert len(ours.state_dict()) == len(keys), (
            f"{name} {part}: {len(ours.state_dict())} tensors in ours, {len(keys)} in the reference")


def test_sdxl_reference_has_its_released_unet_and_two_text_encoders():
    theirs = reference_models(SDXL)
    counts = {part: count_parameters(model) for part, model in theirs.items()}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}, counts
