"""Shipping a quantized network: bit-packed weights, and activation quantization in plain PyTorch ops.

A binary or ternary (or k-bit) weight tensor takes only a few distinct values, ``level x scale``. It is
stored as those values (float32, one row per tensor, or per output channel when the scale is per
channel) and, for each weight, the index of its value packed into ``bits`` bits: 1 for binary, 2 for
ternary and 2-bit. Unpacking gives back exactly the same float32 weights.

The packed file (``.dcqpack``), all numbers little-endian:

    b"DCQPACK1" | header length (uint32) | header (UTF-8 JSON) | payload

The header holds ``meta`` (what the network is: ``arch``, ``dataset``, the activation quantizers) and
``tensors``: one entry per state-dict tensor, in order, with ``name``, ``shape``, ``dtype``, ``offset``
and ``nbytes`` into the payload and ``kind``: ``raw`` (the tensor's bytes, row-major) or ``codes``
(``levels_shape`` [rows, L] float32 values, then the indices, ``bits`` each, row-major, packed from
the lowest bit of each byte up: ``numpy.packbits(bitorder="little")`` of each index's bits, lowest
first).
"""
import json
import math

import numpy as np
import torch
import torch.nn as nn

MAGIC = b"DCQPACK1"


class ClippedActivation(nn.Module):
    """DoReFa's (and PACT's) activation quantization with plain tensor ops, so that it exports to ONNX as
    Clip, Mul, Sub, Round, Add, Div: ``round(scale * clamp(x, 0, clip_val) - zero_point)``, back to
    ``(q + zero_point) / scale``: Distiller's ``ClippedLinearQuantization`` with the same numbers."""

    def __init__(self, clip_val=1.0, scale=1.0, zero_point=0.0):
        super().__init__()
        for name, value in (("clip_val", clip_val), ("scale", scale), ("zero_point", zero_point)):
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32).detach().clone().reshape(()))

    def forward(self, x):
        q = torch.round(self.scale * torch.clamp(x, min=torch.zeros_like(self.clip_val), max=self.clip_val)
                        - self.zero_point)
        return (q + self.zero_point) / self.scale


def to_codes(tensor, bits):
    """(levels [rows, L] float32, indices uint8, one per element) of a tensor holding at most 2**bits values
    (per tensor, or else per row along dim 0); a ``ValueError`` if it holds more."""
    flat = tensor.detach().to("cpu", torch.float32).reshape(len(tensor) if tensor.dim() else 1, -1)
    values, indices = torch.unique(flat, return_inverse=True)
    if len(values) <= 2 ** bits:
        return values.reshape(1, -1), indices.flatten().to(torch.uint8)
    rows = [torch.unique(row, return_inverse=True) for row in flat]
    if max(len(v) for v, _ in rows) > 2 ** bits:
        raise ValueError(f"holds {len(values)} distinct values ({max(len(v) for v, _ in rows)} in one output channel): "
                         f"not {bits}-bit weights")
    width = max(len(v) for v, _ in rows)
    levels = torch.stack([torch.cat([v, v[-1:].expand(width - len(v))]) for v, _ in rows])
    return levels, torch.cat([i for _, i in rows]).to(torch.uint8)


def from_codes(levels, indices, shape):
    """The tensor ``to_codes`` described: each element its row's level at its index."""
    rows = levels.shape[0]
    indices = indices.to(torch.long).reshape(rows, -1)
    return torch.gather(levels, 1, indices).reshape(shape)


def pack_bits(indices, bits):
    """``indices`` (uint8, each < 2**bits) as ``bits`` bits each, lowest bit first."""
    codes = indices.numpy().astype(np.uint8)
    planes = (codes[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data, bits, count):
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * bits, bitorder="little")
    codes = (planes.reshape(count, bits).astype(np.uint8) << np.arange(bits, dtype=np.uint8)).sum(1)
    return torch.from_numpy(codes.astype(np.uint8))


def write_packed(path, meta, state, bits):
    """Write ``state`` (name -> tensor) to ``path``; the tensors named in ``bits`` (name -> bit width) as codes."""
    entries, payload, offset = [], [], 0
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        entry = {"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        if name in bits:
            levels, indices = to_codes(tensor, bits[name])
            data = levels.numpy().astype("<f4").tobytes() + pack_bits(indices, bits[name])
            entry.update(kind="codes", bits=bits[name], levels_shape=list(levels.shape))
        else:
            data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
            entry.update(kind="raw")
        entry.update(offset=offset, nbytes=len(data))
        entries.append(entry)
        payload.append(data)
        offset += len(data)
    header = json.dumps({"format": 1, "meta": meta, "tensors": entries}).encode()
    with open(path, "wb") as f:
        f.write(MAGIC + len(header).to_bytes(4, "little") + header)
        for data in payload:
            f.write(data)


def read_packed(path):
    """(meta, state) of a file ``write_packed`` wrote; a ``ValueError`` naming it if it is not one."""
    with open(path, "rb") as f:
        start = f.read(len(MAGIC) + 4)
        if len(start) < len(MAGIC) + 4 or start[:len(MAGIC)] != MAGIC:
            raise ValueError(f"{path!r} is not a distiller-dcq packed file (no {MAGIC!r} at its start)")
        header = json.loads(f.read(int.from_bytes(start[len(MAGIC):], "little")))
        payload = f.read()
    state = {}
    for entry in header["tensors"]:
        data = payload[entry["offset"]:entry["offset"] + entry["nbytes"]]
        shape, dtype = entry["shape"], getattr(torch, entry["dtype"])
        if entry["kind"] == "codes":
            rows, width = entry["levels_shape"]
            levels = torch.from_numpy(np.frombuffer(data[:rows * width * 4], dtype="<f4").copy()).reshape(rows, width)
            indices = unpack_bits(data[rows * width * 4:], entry["bits"], math.prod(shape))
            state[entry["name"]] = from_codes(levels, indices, shape).to(dtype)
        else:
            state[entry["name"]] = torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape).clone() \
                if data else torch.zeros(shape, dtype=dtype)
    return header["meta"], state
