"""distiller-dcq: Divide and Conquer Quantization (Elthakeb et al., 2020) for Intel's Distiller.

``distiller_dcq.engine`` is plain PyTorch. Importing this package (which the installed
``distiller_dcq.pth`` does at every interpreter start) only arranges that, whenever Distiller is
imported, our YAML classes are registered with ``distiller.config`` and the compat patches for
today's Python/PyTorch/pandas/setuptools are applied. Set ``DISTILLER_DCQ_NO_AUTOLOAD=1`` to stop the
``.pth`` file from doing so.
"""
import sys

from ._hooks import before_import, when_imported

__version__ = "0.1.0"


def _on_distiller_imported(distiller):
    adapter = sys.modules.get(__name__ + ".adapter")
    if adapter is not None and not hasattr(adapter, "register"):
        return  # Distiller was imported by our adapter's own import, which registers once it is complete
    from .adapter import register
    register(distiller)


def _lend_pkg_resources():
    from ._pkg_resources import lend
    return lend()


before_import("distiller", _lend_pkg_resources)  # Distiller imports it; setuptools >= 82 lacks it
when_imported("distiller", _on_distiller_imported)
