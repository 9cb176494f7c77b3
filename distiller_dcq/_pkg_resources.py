"""What Distiller uses of ``pkg_resources``, for a Python whose setuptools (>= 82) no longer has it.

Distiller calls ``require(name)[0].version``, catches ``DistributionNotFound``, compares versions
with ``parse_version`` and lists ``working_set`` (each entry's ``key`` and ``version``) in its run
log. This module gives exactly that, from ``importlib.metadata``. ``lend()`` makes it importable as
``pkg_resources`` while Distiller imports, and only when the real one is missing: other programs
(pytest, for one) take a ``pkg_resources`` in ``sys.modules`` for the real one.
"""
import importlib.metadata
import importlib.util
import re
import sys
import types


class DistributionNotFound(Exception):
    """No installed distribution has this name."""


class Distribution:
    def __init__(self, name, version):
        self.project_name, self.key, self.version = name, name.lower(), version

    def __repr__(self):
        return f"{self.project_name} {self.version}"


def require(name):
    try:
        return [Distribution(name, importlib.metadata.version(name))]
    except importlib.metadata.PackageNotFoundError:
        raise DistributionNotFound(name) from None


def parse_version(version):
    try:
        from packaging.version import Version
        return Version(version)
    except ImportError:  # no packaging: compare the leading release numbers
        return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3])


class _WorkingSet:
    """The installed distributions, read each time it is iterated."""

    def __iter__(self):
        return iter([Distribution(d.metadata["Name"], d.version) for d in importlib.metadata.distributions()
                     if d.metadata["Name"]])


working_set = _WorkingSet()


def _importable(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def lend():
    """If ``pkg_resources`` cannot be imported, make this stand-in importable under its name; return
    the function that takes it back out of ``sys.modules`` (modules that imported it keep it)."""
    if "pkg_resources" in sys.modules or _importable("pkg_resources"):
        return None
    module = types.ModuleType("pkg_resources", __doc__)
    for name in ("DistributionNotFound", "Distribution", "require", "parse_version", "working_set"):
        setattr(module, name, globals()[name])
    sys.modules["pkg_resources"] = module
    return lambda: sys.modules.pop("pkg_resources", None) if sys.modules.get("pkg_resources") is module else None
