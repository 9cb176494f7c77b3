"""Distiller imports ``pkg_resources``, which setuptools >= 82 no longer ships: our stand-in serves it."""
import os
import subprocess
import sys

import pytest
import torch

from distiller_dcq import _pkg_resources as stand_in

# Run in a fresh interpreter where the real pkg_resources cannot be imported, as with setuptools >= 82.
WITHOUT_PKG_RESOURCES = """
import importlib.abc, sys
class NoPkgResources(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "pkg_resources":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoPkgResources())
"""


def test_the_stand_in_answers_what_distiller_asks():
    assert stand_in.require("torch")[0].version == torch.__version__.split("+")[0]
    with pytest.raises(stand_in.DistributionNotFound):
        stand_in.require("no-such-distribution-anywhere")
    assert stand_in.parse_version("1.3.1") < stand_in.parse_version(torch.__version__)
    assert stand_in.parse_version("2.10.0") > stand_in.parse_version("2.9.1")
    assert {d.key: d.version for d in stand_in.working_set}["torch"] == torch.__version__.split("+")[0]


def test_distiller_imports_and_logs_its_environment_without_pkg_resources():
    from distiller_env import import_distiller
    import_distiller()
    code = WITHOUT_PKG_RESOURCES + """
import distiller, distiller.apputils as a
a.log_execution_env_state()  # lists pkg_resources.working_set
print("imported", distiller.__version__, "pkg_resources" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                          timeout=300)
    assert done.returncode == 0 and "imported Unknown False" in done.stdout, done.stdout + done.stderr[-3000:]
    without_us = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                                env={**os.environ, "DISTILLER_DCQ_NO_AUTOLOAD": "1"})
    assert without_us.returncode != 0 and "No module named 'pkg_resources'" in without_us.stderr
