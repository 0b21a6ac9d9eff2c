"""The service README stays true: every variable and every module of the service is in it."""

import re
from pathlib import Path

from cdp_kit.settings import describe
from cdp_orchestration.settings import OrchestrationSettings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_variable_is_documented_in_the_readme():
    assert [var for var, _default, _help in describe(OrchestrationSettings) if f"`{var}`" not in README] == []


def test_every_module_is_listed_where_the_code_is():
    (table,) = re.findall(r"## Where the code is\n(.*?)\n## ", README, flags=re.S)
    modules = [p.name for p in (ROOT / "src" / "cdp_orchestration").glob("*.py") if p.name != "__init__.py"]
    assert sorted(m for m in modules if f"`{m}`" not in table) == []
    assert "`domain/`" in table and "`channels/`" in table
