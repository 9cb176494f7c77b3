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


MAX_CODE_BITS = 8  # wider tensors (a 32-bit bias) are stored raw: an index would be no smaller than the value


def to_codes(tensor, bits):
    """(levels [rows, L] float32, indices uint8, one per element) of a tensor holding at most 2**bits values
    (per tensor, or else per row along dim 0); a ``ValueError`` if it holds more."""
    if not 1 <= bits <= MAX_CODE_BITS:
        raise ValueError(f"codes are 1 to {MAX_CODE_BITS} bits wide, not {bits}")
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
        if bits.get(name, MAX_CODE_BITS + 1) <= MAX_CODE_BITS:
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


DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                                         torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                                         torch.bool)}


def read_packed(path):
    """(meta, state) of a file ``write_packed`` wrote; a ``ValueError`` naming it if it is not one, or if any
    entry does not fit the bytes the file holds (a truncated or crafted file allocates nothing)."""
    def refuse(problem):
        raise ValueError(f"{path!r} is not a distiller-dcq packed file it can read: {problem}")
    with open(path, "rb") as f:
        start = f.read(len(MAGIC) + 4)
        if len(start) < len(MAGIC) + 4 or start[:len(MAGIC)] != MAGIC:
            raise ValueError(f"{path!r} is not a distiller-dcq packed file (no {MAGIC!r} at its start)")
        try:
            header = json.loads(f.read(int.from_bytes(start[len(MAGIC):], "little")))
        except ValueError as err:
            refuse(f"its header is not JSON ({err})")
        payload = f.read()
    if not (isinstance(header, dict) and header.get("format") == 1 and isinstance(header.get("meta"), dict)
            and isinstance(header.get("tensors"), list)):
        refuse("its header is not format 1 with meta and tensors")
    state, end = {}, 0
    for entry in header["tensors"]:
        state[entry.get("name") if isinstance(entry, dict) else None] = _read_entry(entry, payload, end, refuse)
        end = entry["offset"] + entry["nbytes"]
    if end != len(payload):
        refuse(f"its tensors end at byte {end} of a {len(payload)}-byte payload (truncated, or more appended)")
    return header["meta"], state


def _read_entry(entry, payload, end, refuse):
    """One tensor, every number of its entry checked against the payload before anything is allocated."""
    keys = ("name", "shape", "dtype", "kind", "offset", "nbytes")
    if not isinstance(entry, dict) or any(k not in entry for k in keys) or not isinstance(entry["name"], str):
        refuse(f"a tensor entry lacks one of {', '.join(keys)}")
    name, shape, dtype = entry["name"], entry["shape"], DTYPES.get(entry["dtype"])
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)) or dtype is None:
        refuse(f"{name}: shape {shape!r} or dtype {entry['dtype']!r} is not one it writes")
    offset, nbytes, numel = entry["offset"], entry["nbytes"], math.prod(shape)
    if type(offset) is not int or type(nbytes) is not int or offset != end or nbytes < 0 \
            or offset + nbytes > len(payload):
        refuse(f"{name}: bytes {offset!r}-{offset + nbytes if type(nbytes) is int else '?'} are not the next ones "
               f"of the {len(payload)}-byte payload")
    data = payload[offset:offset + nbytes]
    if entry["kind"] == "raw":
        if nbytes != numel * dtype.itemsize:
            refuse(f"{name}: {nbytes} bytes for {numel} {entry['dtype']} values")
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape).clone() if nbytes else \
            torch.zeros(shape, dtype=dtype)
    bits, levels_shape = entry.get("bits"), entry.get("levels_shape")
    if entry["kind"] != "codes" or type(bits) is not int or not 1 <= bits <= MAX_CODE_BITS or not (
            isinstance(levels_shape, list) and len(levels_shape) == 2 and all(type(n) is int for n in levels_shape)):
        refuse(f"{name}: kind {entry['kind']!r}, bits {bits!r}, levels {levels_shape!r} are not one it writes")
    rows, width = levels_shape
    if not (1 <= width <= 2 ** bits and rows >= 1 and numel % rows == 0 and (rows == 1 or rows == (shape or [1])[0])
            and nbytes == rows * width * 4 + math.ceil(numel * bits / 8)):
        refuse(f"{name}: {rows} x {width} levels of {bits}-bit codes for {numel} values do not make {nbytes} bytes")
    levels = torch.from_numpy(np.frombuffer(data[:rows * width * 4], dtype="<f4").copy()).reshape(rows, width)
    indices = unpack_bits(data[rows * width * 4:], bits, numel)
    if numel and int(indices.max()) >= width:
        refuse(f"{name}: an index points past its {width} levels")
    return from_codes(levels, indices, shape).to(dtype)
