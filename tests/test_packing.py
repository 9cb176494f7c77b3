"""The packed format's codes, without Distiller: every value back exactly, the bits per weight promised."""
import pytest
import torch

from distiller_dcq.engine.packing import ClippedActivation, from_codes, pack_bits, read_packed, to_codes, unpack_bits, \
    write_packed


@pytest.mark.parametrize("bits, values", [(1, (-0.37, 0.37)), (2, (-0.2, 0.0, 0.2)), (2, (-1.0, -1 / 3, 1 / 3, 1.0))])
def test_codes_give_back_every_float32_exactly_in_bits_per_weight(bits, values):
    torch.manual_seed(0)
    tensor = torch.tensor(values, dtype=torch.float32)[torch.randint(len(values), (50, 3, 5, 5))]
    levels, indices = to_codes(tensor, bits)
    assert levels.shape == (1, len(values))
    packed = pack_bits(indices, bits)
    assert len(packed) == -(-tensor.numel() * bits // 8)
    assert torch.equal(from_codes(levels, unpack_bits(packed, bits, tensor.numel()), tensor.shape), tensor)


def test_a_scale_per_output_channel_gets_levels_per_channel_and_more_values_are_refused():
    torch.manual_seed(0)
    signs = torch.randint(2, (8, 16)).float() * 2 - 1
    tensor = signs * torch.linspace(0.1, 0.8, 8)[:, None]  # binary, one scale per row: 16 values in all
    levels, indices = to_codes(tensor, 1)
    assert levels.shape == (8, 2) and torch.equal(from_codes(levels, indices, tensor.shape), tensor)
    with pytest.raises(ValueError, match=r"holds 17 distinct values \(3 in one output channel\): not 1-bit weights"):
        to_codes(torch.cat([tensor, torch.zeros(8, 1)], 1), 1)


def test_a_file_round_trips_every_dtype(tmp_path):
    state = {"w": torch.tensor([[0.5, -0.5], [-0.5, 0.5]]), "b": torch.randn(3), "n": torch.tensor(7),
             "h": torch.randn(4).bfloat16(), "e": torch.zeros(0)}
    write_packed(tmp_path / "f.dcqpack", {"arch": "x"}, state, {"w": 1})
    meta, back = read_packed(tmp_path / "f.dcqpack")
    assert meta == {"arch": "x"} and all(torch.equal(v, back[k]) and v.dtype == back[k].dtype for k, v in state.items())


def test_the_activation_module_is_distillers_clipped_linear_quantization():
    x = torch.linspace(-1, 2, 1001)
    q = ClippedActivation(clip_val=1.0, scale=3.0, zero_point=0.0)(x)
    assert torch.equal(q, torch.round(3 * x.clamp(0, 1)) / 3)


def _packed(tmp_path):
    state = {"w": torch.tensor([[0.5, -0.5], [-0.5, 0.5]]), "b": torch.randn(3)}
    write_packed(tmp_path / "f.dcqpack", {"arch": "x"}, state, {"w": 1})
    return (tmp_path / "f.dcqpack").read_bytes()


def _with_header(data, change):
    import json
    length = int.from_bytes(data[8:12], "little")
    header = json.loads(data[12:12 + length])
    change(header)
    text = json.dumps(header).encode()
    return data[:8] + len(text).to_bytes(4, "little") + text + data[12 + length:]


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:-4], "tensors end at byte|bytes .* are not the next ones"),
    (lambda d: d + b"\0" * 8, r"its tensors end at byte (\d+) of a \d+-byte payload"),
    (lambda d: _with_header(d, lambda h: h["tensors"][1].update(shape=[2 ** 31, 2 ** 31])), "values"),
    (lambda d: _with_header(d, lambda h: h["tensors"][0].update(shape=[2 ** 20, 2 ** 20])), "do not make"),
    (lambda d: _with_header(d, lambda h: h["tensors"][0].update(bits=40)), "are not one it writes"),
    (lambda d: _with_header(d, lambda h: h["tensors"][1].update(dtype="load")), "is not one it writes"),
    (lambda d: _with_header(d, lambda h: h["tensors"][1].update(offset=-3)), "are not the next ones"),
    (lambda d: _with_header(d, lambda h: h.update(format=2)), "not format 1"),
    (lambda d: _with_header(d, lambda h: h.pop("tensors")), "not format 1"),
], ids=["truncated", "appended", "huge-raw", "huge-codes", "bits", "dtype", "offset", "format", "no-tensors"])
def test_a_damaged_or_crafted_file_is_refused_before_anything_is_allocated(tmp_path, damage, message):
    """Found by review: a truncated download loaded as zeros; a 158-byte file asked for 16 GiB."""
    (tmp_path / "bad.dcqpack").write_bytes(damage(_packed(tmp_path)))
    with pytest.raises(ValueError, match=message):
        read_packed(tmp_path / "bad.dcqpack")
