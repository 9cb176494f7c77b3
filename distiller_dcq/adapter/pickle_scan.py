"""A checkpoint file's pickle, read opcode by opcode before anything is unpickled.

``torch.load(weights_only=True)`` runs no code from the file, but some files still hurt it:

- nesting: a tuple nested a million deep, used as a dict key, makes the interpreter recurse in C while
  hashing it (a crash, not an exception);
- allocation: torch's default allow-list lets the file call ``bytearray(n)``, ``torch.Tensor(n)`` or
  ``UntypedStorage(n)`` with an ``n`` of its choice, a storage record may claim more bytes than it has
  (or be compressed), and a tensor may claim more elements than its storage holds (stride 0).

So the scan refuses, before unpickling: any global not on the caller's list of names (``accepted``:
what Distiller checkpoints name), nesting deeper than ``MAX_NESTING``, more memo entries than
``MAX_MEMO``, storages larger than the bytes the file holds for them, tensors with more elements than
their storage. It reads the bytes torch will read, with torch's own tests and readers: the zip archive
(torch >= 1.6: torch's ``_is_zipfile`` and its miniz reader, ``PyTorchFileReader``, not Python's
``zipfile``, which finds other members in a crafted file) and the legacy sequence of pickles followed
by raw storages. Its cost is linear in the pickle's size.
"""
import _compat_pickle
import io
import math
import os
import pickletools
import tarfile

import torch

MAX_NESTING = 1000  # Distiller checkpoints nest about 10 deep; C recursion crashes at about 100,000
MAX_MEMO = 10_000_000  # entries; a checkpoint of a large network has tens of thousands
LEGACY_PICKLES = 5  # magic number, protocol, system info, the object, the storage keys

_NO_VALUE = object()  # the value of an entry the scan does not follow
_MUTATING = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}  # change the object below them


class UnsafePickle(ValueError):
    """A checkpoint file that the scan refuses before unpickling it."""


class _Entry:
    """An object the pickle builds: how deep it nests, what holds it, and its value where the scan needs
    it (strings and numbers that name globals and describe storages, the global names themselves)."""
    __slots__ = ("depth", "holders", "value")

    def __init__(self, depth=0, value=_NO_VALUE):
        self.depth, self.holders, self.value = depth, [], value


class _Global(str):
    """A global's dotted name, as the value of the entry that refers to it."""


class _Storage:
    """A storage the pickle refers to (a persistent id): its size in bytes and its elements' size."""

    def __init__(self, nbytes, itemsize):
        self.nbytes, self.itemsize = nbytes, itemsize


TENSOR_REBUILDS = ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3")
# accepted as what a storage id names (its type), never called: UntypedStorage(n) allocates n bytes
NOT_CALLABLE = ("torch.storage.UntypedStorage",)
_CALLS = ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST")


def _literal(op, arg):
    if op.name in ("NONE", "NEWTRUE", "NEWFALSE"):
        return {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[op.name]
    if op.name.endswith(("INT", "INT1", "INT2", "LONG", "LONG1", "LONG4", "FLOAT")) or "UNICODE" in op.name \
            or "STRING" in op.name:
        return arg
    return _NO_VALUE


class _PickleScan:
    """The scan of one pickle: its stack, marks and memo, as entries instead of objects."""

    def __init__(self, accepted, on_storage):
        self.accepted, self.on_storage = accepted, on_storage
        self.stack, self.marks, self.memo = [], [], {}
        self.work_left = 0  # depth updates allowed (a pickle of n opcodes gets 4 n: a real one needs about n)

    def deepen(self, entry, depth):
        """``entry`` now holds something ``depth - 1`` deep: raise it, and whatever holds it, to fit."""
        todo = [(entry, depth)]
        while todo:
            entry, depth = todo.pop()
            if depth <= entry.depth:
                continue
            entry.depth = depth
            self.work_left -= 1
            if depth > MAX_NESTING:
                raise UnsafePickle(f"objects nest more than {MAX_NESTING} deep (a crafted file: loading it would "
                                   f"crash the interpreter)")
            if self.work_left < 0:
                raise UnsafePickle("objects are held by each other far more often than in any checkpoint")
            todo.extend((holder, depth + 1) for holder in entry.holders)

    def hold(self, holder, parts):
        self.deepen(holder, 1 + max((p.depth for p in parts), default=-1))
        for part in parts:
            part.holders.append(holder)

    def pop_operands(self, op):
        """What ``op`` consumes: the entries above the last mark, below them a fixed number of entries."""
        before, stack = op.stack_before, self.stack
        fixed = before.index(pickletools.markobject) if pickletools.markobject in before else len(before)
        start = self.marks.pop() if pickletools.markobject in before else len(stack)
        if start < fixed or start > len(stack):
            raise UnsafePickle(f"not a well-formed pickle ({op.name} with too few objects on the stack)")
        parts = stack[start - fixed:]
        del stack[start - fixed:]
        return parts

    def run(self, stream):
        for op, arg, _ in pickletools.genops(stream):
            self.work_left += 4
            self.step(op, arg)

    def step(self, op, arg):
        name, stack = op.name, self.stack
        if name in ("PROTO", "FRAME", "STOP"):
            return
        if name == "MARK":
            self.marks.append(len(stack))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            self.memo[len(self.memo) if name == "MEMOIZE" else arg] = stack[-1]
            if len(self.memo) > MAX_MEMO:
                raise UnsafePickle(f"the pickle memoizes more than {MAX_MEMO} objects")
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in self.memo:
                raise UnsafePickle(f"the pickle reads memo entry {arg}, which it never wrote")
            stack.append(self.memo[arg])
        elif name == "DUP":
            stack.append(stack[-1])
        elif name == "POP":
            stack.pop()
        elif name == "POP_MARK":
            del stack[self.marks.pop():]
        elif name.startswith("EXT"):
            raise UnsafePickle("the pickle uses the copyreg extension registry, which checkpoints never do")
        elif name in _MUTATING:  # the object below the operands now holds them
            parts = self.pop_operands(op)
            if isinstance(parts[0].value, _Storage):
                raise UnsafePickle("the pickle sets the state of a storage, which torch.save never does")
            self.hold(parts[0], parts[1:])
            stack.append(parts[0])
        else:
            parts = self.pop_operands(op)
            entry = _Entry(value=self.value(op, arg, parts))
            self.hold(entry, parts)
            stack.append(entry)

    def value(self, op, arg, parts):
        name = op.name
        if name in ("GLOBAL", "STACK_GLOBAL"):
            module, qualname = arg.split(" ", 1) if name == "GLOBAL" else (p.value for p in parts)
            if not (type(module) is str and type(qualname) is str):
                raise UnsafePickle("the pickle names a global by strings it computes")
            module, qualname = _python3_name(module, qualname)
            if f"{module}.{qualname}" not in self.accepted:
                raise UnsafePickle(f"the checkpoint names {module}.{qualname}, which a Distiller checkpoint does "
                                   f"not hold")
            return _Global(f"{module}.{qualname}")
        if name in ("PERSID", "BINPERSID"):
            return self.on_storage(parts[0].value if name == "BINPERSID" else arg)
        if name.startswith("TUPLE") or name == "EMPTY_TUPLE":
            return tuple(p.value for p in parts)
        if name in _CALLS and parts and parts[0].value in NOT_CALLABLE:
            raise UnsafePickle(f"the pickle calls {parts[0].value}, which a checkpoint only names")
        if name == "REDUCE" and parts[0].value in TENSOR_REBUILDS:
            _check_tensor(parts[0].value, parts[1].value)
        return _literal(op, arg)


def _python3_name(module, qualname):
    """The name an unpickler looks up for a protocol-2 pickle's Python 2 name (``__builtin__.bytearray``)."""
    if (module, qualname) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, qualname)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), qualname


def scan_pickle(stream, accepted, on_storage):
    """Read one pickle from ``stream`` (to its STOP) without building it; refuse (``UnsafePickle``) a
    global outside ``accepted``, deep nesting, a huge memo or a tensor larger than its storage; for each
    storage it refers to, ``on_storage(persistent_id)`` (the id as a tuple of plain values, global names
    as ``str``) checks it and returns its ``_Storage``."""
    try:
        _PickleScan(accepted, on_storage).run(stream)
    except UnsafePickle:
        raise
    except (ValueError, IndexError, KeyError, TypeError) as err:  # genops' own, or a malformed stack
        raise UnsafePickle(f"not a well-formed pickle ({err})") from err


def _check_tensor(rebuild, args):
    """Refuse a tensor (``_rebuild_tensor_v2/v3(storage, offset, size, stride, ...)``) whose elements do not
    all lie in its storage, or that has more elements than its storage (a broadcast view, stride 0)."""
    if not (isinstance(args, tuple) and len(args) >= 4 and isinstance(args[0], _Storage)):
        raise UnsafePickle(f"the pickle rebuilds a tensor from {args!r}, not from a storage, offset, size and stride")
    storage, offset, size, stride = args[:4]
    itemsize = storage.itemsize
    if rebuild.endswith("_v3"):  # an untyped storage and the tensor's dtype
        dtype = args[6] if len(args) > 6 else None
        dtype = getattr(torch, dtype.rpartition(".")[2], None) if isinstance(dtype, _Global) else None
        if not isinstance(dtype, torch.dtype):
            raise UnsafePickle("the pickle rebuilds a tensor of no known dtype")
        itemsize = torch._utils._element_size(dtype)
    numbers = (offset, *size, *stride) if isinstance(size, tuple) and isinstance(stride, tuple) else (None,)
    if len(size or ()) != len(stride or ()) or not all(type(n) is int and n >= 0 for n in numbers):
        raise UnsafePickle(f"the pickle rebuilds a tensor with offset {offset!r}, size {size!r}, stride {stride!r}")
    elements = math.prod(size)
    end = offset + sum((n - 1) * step for n, step in zip(size, stride)) + 1 if elements else 0
    if max(end, elements) * itemsize > storage.nbytes:
        raise UnsafePickle(f"a tensor of size {size} (stride {stride}, offset {offset}) claims more than its storage's "
                           f"{storage.nbytes} bytes")


def _storage(persistent_id):
    """The ``_Storage`` a storage id (``('storage', type, key, location, numel[, view])``) asks for, and its key."""
    if not (isinstance(persistent_id, tuple) and len(persistent_id) >= 5 and persistent_id[0] == "storage"):
        raise UnsafePickle(f"the pickle refers to {persistent_id!r}, which is not one of torch's storages")
    storage_type, key, numel = persistent_id[1], persistent_id[2], persistent_id[4]
    if not isinstance(storage_type, _Global) or type(key) is not str or type(numel) is not int or numel < 0:
        raise UnsafePickle(f"the pickle refers to a storage {persistent_id!r} of no known type, key or size")
    short = storage_type.rpartition(".")[2]
    dtype = torch.uint8 if short == "UntypedStorage" else torch.storage._get_dtype_from_pickle_storage_type(short)
    itemsize = torch._utils._element_size(dtype)
    return _Storage(numel * itemsize, itemsize), key


def scan_checkpoint(file, accepted):
    """Refuse (``UnsafePickle``) a checkpoint file (path or seekable binary file object) that ``torch.load``
    must not be handed: see the module's docstring. A file object is put back where it was."""
    opened = file if hasattr(file, "read") else open(os.fspath(file), "rb")
    position = opened.tell()
    try:
        size = opened.seek(0, io.SEEK_END) - position
        opened.seek(position)
        if torch.serialization._is_zipfile(opened):  # what torch.load decides by: the first 4 bytes
            _scan_archive(torch._C.PyTorchFileReader(opened), size, accepted)
        elif _is_tar(opened):
            raise UnsafePickle("a tar archive (torch < 0.4's format): re-save it with a current torch")
        else:
            _scan_legacy(opened, size, accepted)
    finally:
        if opened is file:
            opened.seek(position)
        else:
            opened.close()


def _is_tar(opened):
    position = opened.tell()
    try:
        return tarfile.is_tarfile(opened)
    except Exception:
        return False
    finally:
        opened.seek(position)


def _scan_archive(reader, size, accepted):
    """The archive as torch reads it: its data.pkl, the records its storages name (each no larger than the
    file: torch.save stores records uncompressed, and a compressed one could inflate to any size)."""
    pickled = reader.get_record_size("data.pkl") if reader.has_record("data.pkl") else None
    if pickled is None or pickled > size:
        raise UnsafePickle("the archive has no data.pkl torch can read" if pickled is None else
                           f"its data.pkl unpacks to {pickled} bytes, more than the file's {size} (compressed)")
    seen = {}

    def check(persistent_id):
        storage, key = _storage(persistent_id)
        record = f"data/{key}"
        held = reader.get_record_size(record) if reader.has_record(record) else None
        if held is None or storage.nbytes > held:
            raise UnsafePickle(f"a storage claims {storage.nbytes} bytes, but its record {record!r} holds "
                               f"{'none' if held is None else held}")
        seen[key] = held
        if sum(seen.values()) > size:
            raise UnsafePickle(f"its storage records unpack to more than the file's {size} bytes (compressed)")
        return storage
    scan_pickle(io.BytesIO(reader.get_record("data.pkl")), accepted, check)


def _scan_legacy(stream, size, accepted):
    claimed = {}

    def check(persistent_id):
        storage, key = _storage(persistent_id)
        claimed[key] = max(storage.nbytes, claimed.get(key, 0))
        if sum(claimed.values()) > size:
            raise UnsafePickle(f"its storages claim {sum(claimed.values())} bytes, more than the file's {size}")
        return storage
    for _ in range(LEGACY_PICKLES):
        scan_pickle(stream, accepted, check)
