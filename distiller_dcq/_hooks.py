"""Run a function right before or right after a module is imported.

This is how ``distiller_dcq`` reaches into Distiller without importing it: the hooks fire when
the user's program imports Distiller, whatever the import order. Imports nothing heavy, because
the ``distiller_dcq.pth`` file installed with the package runs it at every interpreter start.
"""
import importlib.abc
import sys

_before, _after = {}, {}  # module name -> callbacks still to run


def when_imported(module_name, callback):
    """Call ``callback(module)`` once ``module_name`` has finished importing (at once if it has)."""
    if module_name in sys.modules:
        callback(sys.modules[module_name])
        return
    _after.setdefault(module_name, []).append(callback)
    _install_finder()


def before_import(module_name, callback):
    """Call ``callback()`` right before ``module_name``'s code first runs (never, if it already has).
    If it returns a function, that is called once the module's code has run (or failed)."""
    if module_name not in sys.modules:
        _before.setdefault(module_name, []).append(callback)
        _install_finder()


def _install_finder():
    if not any(isinstance(f, _HookingFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _HookingFinder())


class _HookingFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _before and fullname not in _after:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _HookingLoader(spec.loader)
                return spec
        return None


class _HookingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        undo = [callback() for callback in _before.pop(module.__name__, [])]
        try:
            self.loader.exec_module(module)
        finally:
            for fn in filter(None, undo):
                fn()
        for callback in _after.pop(module.__name__, []):
            callback(module)

    def __getattr__(self, name):
        return getattr(self.loader, name)
