from pathlib import Path

from cdp_identity.settings import IdentitySettings
from cdp_kit.settings import describe


def test_every_variable_is_documented_in_the_readme():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert [var for var, _default, _help in describe(IdentitySettings) if f"`{var}`" not in readme] == []
