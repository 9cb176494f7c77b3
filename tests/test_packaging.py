"""What `pip install .` ships: the tests run against the installed copy, and it carries every schedule."""
import os
from pathlib import Path

import pytest

import distiller_dcq
from conftest import ROOT
from distiller_dcq.report.schedules import schedules_dir


def checkout_tested_on_purpose():
    """DCQ_TEST_CHECKOUT=1, or the checkout named on PYTHONPATH (README: 'How Distiller finds DCQ')."""
    on_path = {Path(p).resolve() for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    return os.environ.get("DCQ_TEST_CHECKOUT") == "1" or ROOT.resolve() in on_path


def test_the_tests_import_the_installed_package_not_the_checkout():
    if checkout_tested_on_purpose():
        pytest.skip("testing the checkout on purpose (DCQ_TEST_CHECKOUT=1 or the checkout on PYTHONPATH)")
    imported = Path(distiller_dcq.__file__).resolve().parent
    assert imported != (ROOT / "distiller_dcq").resolve(), (
        f"the tests imported the checkout's distiller_dcq ({imported}), not the installed copy, so they cannot "
        f"see what `pip install .` leaves out: install it with `pip install .` (not -e), or set "
        f"DCQ_TEST_CHECKOUT=1 to test the checkout on purpose")


def test_the_package_finds_every_schedule_of_the_repository():
    repository = {p.name: p.read_text() for p in (ROOT / "schedules").glob("*.yaml")}
    found = schedules_dir()
    shipped = {p.name: p.read_text() for p in found.glob("*.yaml")}
    assert repository, f"no schedules in {ROOT / 'schedules'}"
    assert sorted(set(repository) - set(shipped)) == [], f"missing from {found}: reinstall (pip install .)"
    stale = sorted(name for name in repository if shipped[name] != repository[name])
    assert stale == [], f"{found} holds older copies of {stale}: reinstall (pip install .)"
