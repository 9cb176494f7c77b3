"""A checkpoint file's pickle, read opcode by opcode before anything is unpickled.

``torch.load(weights_only=True)`` runs no code from the file, but some files still hurt it:

- nesting: a tuple nested a million deep, used as a dict key, makes the interpreter recurse in C while
  hashing it (a crash, not an exception);
- allocation: torch's default allow-list lets the file call ``bytearray(n)``, ``torch.Tensor(n)`` or
  ``UntypedStorage(n)`` with an ``n`` of its choice, and a storage record may claim more bytes than it has.

So the scan refuses, before unpickling: any global not on the caller's list of names (``accepted``:
what Distiller checkpoints name), nesting deeper than ``MAX_NESTING``, more memo entries than
``MAX_MEMO``, compressed archive members (torch never writes them: a zip bomb), and storages larger
than the bytes the file holds for them. Torch's two formats are read: the zip archive (torch >= 1.6)
and the legacy sequence of pickles followed by raw storages.
"""
import _compat_pickle
import io
import os
import pickletools
import tarfile
import zipfile

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
        self.work_left = 0  # depth updates allowed (a pickle of n opcodes gets 100 n: a real one needs about n)

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
            self.work_left += 100
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
            if not (isinstance(module, str) and isinstance(qualname, str)):
                raise UnsafePickle("the pickle names a global by strings it computes")
            module, qualname = _python3_name(module, qualname)
            if f"{module}.{qualname}" not in self.accepted:
                raise UnsafePickle(f"the checkpoint names {module}.{qualname}, which a Distiller checkpoint does "
                                   f"not hold")
            return _Global(f"{module}.{qualname}")
        if name in ("PERSID", "BINPERSID"):
            self.on_storage(parts[0].value if name == "BINPERSID" else arg)
        if name.startswith("TUPLE") or name == "EMPTY_TUPLE":
            values = tuple(p.value for p in parts)
            return _NO_VALUE if any(v is _NO_VALUE for v in values) else values
        return _literal(op, arg)


def _python3_name(module, qualname):
    """The name an unpickler looks up for a protocol-2 pickle's Python 2 name (``__builtin__.bytearray``)."""
    if (module, qualname) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, qualname)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), qualname


def scan_pickle(stream, accepted, on_storage):
    """Read one pickle from ``stream`` (to its STOP) without building it; refuse (``UnsafePickle``) a
    global outside ``accepted``, deep nesting or a huge memo; call ``on_storage(persistent_id)`` for each
    storage it refers to (the id as a tuple of plain values, global names as ``str``)."""
    try:
        _PickleScan(accepted, on_storage).run(stream)
    except UnsafePickle:
        raise
    except (ValueError, IndexError, KeyError, TypeError) as err:  # genops' own, or a malformed stack
        raise UnsafePickle(f"not a well-formed pickle ({err})") from err


def _storage_bytes(persistent_id):
    """The bytes a storage id (``('storage', type, key, location, numel[, view])``) asks for, and its key."""
    if not (isinstance(persistent_id, tuple) and len(persistent_id) >= 5 and persistent_id[0] == "storage"):
        raise UnsafePickle(f"the pickle refers to {persistent_id!r}, which is not one of torch's storages")
    storage_type, key, numel = persistent_id[1], persistent_id[2], persistent_id[4]
    if not isinstance(storage_type, _Global) or type(numel) is not int or numel < 0:
        raise UnsafePickle(f"the pickle refers to a storage {persistent_id!r} of no known type or size")
    short = storage_type.rpartition(".")[2]
    dtype = torch.uint8 if short == "UntypedStorage" else torch.storage._get_dtype_from_pickle_storage_type(short)
    return numel * torch._utils._element_size(dtype), key


def scan_checkpoint(file, accepted):
    """Refuse (``UnsafePickle``) a checkpoint file (path or binary file object) that ``torch.load`` must not
    be handed: see the module's docstring. A file object is read and put back where it was."""
    if hasattr(file, "read"):
        position = file.tell()
        data = file.read()
        file.seek(position)
    else:
        with open(os.fspath(file), "rb") as opened:
            data = opened.read()
    if zipfile.is_zipfile(io.BytesIO(data)):
        _scan_archive(zipfile.ZipFile(io.BytesIO(data)), accepted)
    elif _is_tar(data):
        raise UnsafePickle("a tar archive (torch < 0.4's format): re-save it with a current torch")
    else:
        _scan_legacy(io.BytesIO(data), accepted)


def _is_tar(data):
    try:
        return tarfile.is_tarfile(io.BytesIO(data))
    except Exception:
        return False


def _scan_archive(archive, accepted):
    members = archive.infolist()
    compressed = [m.filename for m in members if m.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise UnsafePickle(f"archive members are compressed ({compressed[0]}), which torch.save never does")
    sizes = {m.filename: m.file_size for m in members}
    pickles = [name for name in sizes if name.endswith("/data.pkl") or name == "data.pkl"]
    if len(pickles) != 1:
        raise UnsafePickle(f"the archive holds {len(pickles)} data.pkl files, a torch checkpoint one")
    prefix = pickles[0][:-len("data.pkl")]

    def check(persistent_id):
        nbytes, key = _storage_bytes(persistent_id)
        record = f"{prefix}data/{key}"
        if nbytes > sizes.get(record, -1):
            raise UnsafePickle(f"a storage claims {nbytes} bytes, but its record {record!r} holds "
                               f"{sizes.get(record, 'none')}")
    scan_pickle(io.BytesIO(archive.read(pickles[0])), accepted, check)


def _scan_legacy(stream, accepted):
    size, claimed = len(stream.getbuffer()), {}

    def check(persistent_id):
        nbytes, key = _storage_bytes(persistent_id)
        claimed[key] = max(nbytes, claimed.get(key, 0))
        if sum(claimed.values()) > size:
            raise UnsafePickle(f"its storages claim {sum(claimed.values())} bytes, more than the file's {size}")
    for _ in range(LEGACY_PICKLES):
        scan_pickle(stream, accepted, check)
