"""The wire format of the grader and its student-code worker (codec.py): what crosses, and what may not."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from minildm.attention import OnlineSoftmax
from minildm.autoencoder import AutoencoderConfig, DiagonalGaussian, ResBlock
from minildm.grading.codec import CodecError, decode, encode, path_of


def test_tensors_numbers_containers_and_dtypes_cross_unchanged_in_both_directions():
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    value = {"x": x, "ints": torch.arange(4), "half": torch.ones(2, dtype=torch.bfloat16), "n": 3, "f": 0.5,
             "s": "text", "none": None, "list": [1, (2, 3)], "set": {4}, "dtype": torch.float16,
             "device": torch.device("cpu"), "scalar": torch.tensor(2.0), "empty": torch.zeros(0, 5), 7: "int key"}
    back = decode(encode(value))
    assert back.keys() == value.keys() and back["list"] == [1, (2, 3)] and back["set"] == {4}
    assert torch.equal(back["x"], x) and back["x"].requires_grad and back["x"].dtype == torch.float64
    assert back["half"].dtype == torch.bfloat16 and back["scalar"].shape == () and back["empty"].shape == (0, 5)
    assert back["dtype"] is torch.float16 and back[7] == "int key"


def test_a_generator_crosses_with_its_state():
    generator = torch.Generator().manual_seed(5)
    back = decode(encode(generator))
    assert torch.equal(torch.randn(3, generator=back), torch.randn(3, generator=generator))


def test_the_worker_rebuilds_a_module_with_shared_weights_without_calling_its_constructor():
    block = ResBlock(4, 8, groups=2)
    pair = [block, block]
    a, b = decode(encode(pair), rebuild=True)
    assert a is b and type(a) is ResBlock and isinstance(a.conv1.weight, torch.nn.Parameter)
    x = torch.randn(1, 4, 5, 5)
    assert torch.equal(a(x), block(x))
    posterior = decode(encode(DiagonalGaussian(torch.randn(1, 4, 2, 2))), rebuild=True)
    assert posterior.mean.shape == (1, 2, 2, 2)
    assert decode(encode(AutoencoderConfig()), rebuild=True) == AutoencoderConfig()


def test_the_grader_builds_only_the_classes_it_allows_and_by_their_constructor():
    state = OnlineSoftmax(torch.zeros(2, 1), torch.ones(2, 1), torch.zeros(2, 3))
    allowed = {path_of(OnlineSoftmax): OnlineSoftmax}
    assert isinstance(decode(encode(state), allowed=allowed), OnlineSoftmax)
    with pytest.raises(CodecError, match="may not be built here"):
        decode(encode(state))
    with pytest.raises(CodecError, match="may not be built here"):
        decode(encode(ResBlock(4, 4, groups=2)))


@pytest.mark.parametrize("header", [{"value": {"$o": "os:system", "d": {"$d": []}}},
                                    {"value": {"$nt": "subprocess:Popen", "v": ["id"]}},
                                    {"value": {"$dc": "builtins:eval", "f": {"$d": [["x", "1"]]}}},
                                    {"value": {"$ref": 3}}, {"value": {"$t": "missing"}}, {"no value": 1},
                                    {"value": {"$dtype": "tensor"}}])
def test_a_forged_message_from_the_worker_is_a_codec_error_and_runs_nothing(header):
    text = json.dumps(header).encode()
    with pytest.raises(CodecError):
        decode(struct.pack("<Q", len(text)) + text)


@pytest.mark.parametrize("data", [b"", b"\xff" * 8, struct.pack("<Q", 3) + b"{}}", struct.pack("<Q", 2) + b"{}x",
                                  struct.pack("<Q", 2) + b"{}" + b"\x00" * 20,
                                  struct.pack("<Q", 200000) + b"[" * 100000 + b"]" * 100000])
def test_malformed_bytes_are_a_codec_error(data):
    with pytest.raises(CodecError):
        decode(data)


def test_code_and_files_cannot_be_sent():
    with pytest.raises(CodecError, match="cannot be sent"):
        encode(lambda: 1)
    with pytest.raises(CodecError, match="cannot be sent"):
        encode({"f": open})


def test_numpy_arrays_patterns_meta_tensors_and_what_post_init_set_cross_as_the_task_tests_need():
    import re

    import numpy as np

    from minildm.clip_tokenizer import CLIPTokenizer
    from minildm.schedule import NoiseSchedule

    steps, pattern = np.array([999, 899, 799]), re.compile(r"<\|[a-z]+\|>", re.IGNORECASE)
    meta = torch.zeros(3, 16, dtype=torch.float16, device="meta")
    back = decode(encode([steps, np.int64(7), pattern, meta]))
    assert isinstance(back[0], np.ndarray) and back[0].tolist() == steps.tolist() and back[1] == 7
    assert back[2].pattern == pattern.pattern and back[2].flags == pattern.flags
    assert back[3].device.type == "meta" and back[3].shape == (3, 16) and back[3].dtype == torch.float16
    schedule = decode(encode(NoiseSchedule(prediction_type="v_prediction")), rebuild=True)
    assert torch.equal(schedule.alpha_bar, NoiseSchedule(prediction_type="v_prediction").alpha_bar)
    tokenizer = decode(encode(CLIPTokenizer.shipped()), rebuild=True)         # callable, yet data
    assert tokenizer.encode("a cat, sitting") == [320, 2368, 267, 4919]


def test_a_long_list_or_dict_is_sent_once_and_then_named_by_its_number():
    vocabulary = {f"word{i}": i for i in range(2000)}
    numbers: dict[int, int] = {}

    def keep(x):
        fresh = id(x) not in numbers
        numbers.setdefault(id(x), len(numbers))
        return numbers[id(x)], fresh

    kept: dict = {}
    first, second = encode([vocabulary], keep=keep), encode([vocabulary], keep=keep)
    assert len(second) < len(first) / 100
    assert decode(first, kept=kept) == [vocabulary] and decode(second, kept=kept)[0] is kept[0]
    with pytest.raises(CodecError):
        decode(second)                                             # without the kept values it means nothing
