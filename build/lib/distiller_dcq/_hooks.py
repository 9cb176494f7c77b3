"""Run a function right after a module is imported (or at once if it already is).

This is how ``distiller_dcq`` reaches into Distiller without importing it: the hooks fire when
the user's program imports Distiller, whatever the import order. Imports nothing heavy, because
the ``distiller_dcq.pth`` file installed with the package runs it at every interpreter start.
"""
import importlib.abc
import sys

_pending = {}  # module name -> callbacks still to run


def when_imported(module_name, callback):
    """Call ``callback(module)`` once ``module_name`` has finished importing."""
    if module_name in sys.modules:
        callback(sys.modules[module_name])
        return
    _pending.setdefault(module_name, []).append(callback)
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PostImportLoader(spec.loader)
                return spec
        return None


class _PostImportLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        for callback in _pending.pop(module.__name__, []):
            callback(module)

    def __getattr__(self, name):
        return getattr(self.loader, name)
