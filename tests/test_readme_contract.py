"""The README's set-up commands are the ones CI runs."""
import re

from conftest import ROOT


def test_ci_runs_the_readmes_two_set_up_commands():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up and test\n\n```bash\n(.*?)```", readme, re.S)
    assert block, "README.md lost its 'Set up and test' bash block"
    commands = block.group(1).strip().splitlines()
    assert len(commands) == 2
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in commands:
        assert command in ci_lines, f".ci/run does not run the README's command {command!r}"
