"""The README cannot rot: its Python example runs, and its command-line CRMs are the ones registered."""

import re
from pathlib import Path

from cdp_crm_emulators import EMULATORS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_the_python_example_runs():
    (example,) = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    exec(compile(example, "README.md", "exec"), {"__name__": "readme"})


def test_the_readme_names_every_crm_the_command_line_serves():
    (listed,) = re.findall(r"`<crm>` is (.*?); ", README)
    assert set(re.findall(r"`(\w+)`", listed)) == set(EMULATORS)
