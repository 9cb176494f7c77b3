"""The start-up hook that lets an unmodified compress_classifier.py find our YAML classes."""
import os
import subprocess
import sys
import textwrap

from distiller_dcq._hooks import when_imported


def in_fresh_python(code, **env):
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    return done.returncode, done.stdout + done.stderr


def test_the_installed_pth_file_loads_the_package_at_start_up_unless_turned_off():
    rc, out = in_fresh_python("import sys; print('distiller_dcq' in sys.modules)")
    assert rc == 0 and out.strip() == "True", "distiller_dcq.pth is not installed: pip install . (not -e)"
    rc, out = in_fresh_python("import sys; print('distiller_dcq' in sys.modules)", DISTILLER_DCQ_NO_AUTOLOAD="1")
    assert rc == 0 and out.strip() == "False"


def test_start_up_import_stays_light():
    rc, out = in_fresh_python("import sys; print(sorted(m for m in ('torch', 'distiller', 'numpy') if m in sys.modules))")
    assert rc == 0 and out.strip() == "[]"


def test_when_imported_runs_after_a_later_import_and_at_once_for_a_loaded_module(tmp_path, monkeypatch):
    (tmp_path / "dcq_hook_probe.py").write_text(textwrap.dedent("""
        VALUE = 41
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    when_imported("dcq_hook_probe", lambda m: seen.append(m.VALUE + 1))
    assert seen == []
    import dcq_hook_probe  # noqa: F401
    assert seen == [42]
    when_imported("dcq_hook_probe", lambda m: seen.append(m.VALUE))
    assert seen == [42, 41]
    sys.modules.pop("dcq_hook_probe")
