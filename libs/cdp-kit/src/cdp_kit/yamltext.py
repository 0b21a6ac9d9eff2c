"""YAML that people write for the platform (journeys, rules, catalogues, CRM mappings) read as plain data.

One reader for all of it: PyYAML's safe loader (no tags that build objects) with YAML 1.2's booleans.
YAML 1.1, which PyYAML follows, also reads on/off/yes/no/y/n as booleans: the documented journey entry
`{segment: vip, on: entered}` becomes the key True, a rule or catalogue listing an event called `No` or a
segment called `on` gets a boolean where a name was meant, and the document is refused or, worse, quietly
means something else. Here only true/false (any of the three cases YAML 1.2 allows) are booleans; every
other word stays a string. Numbers, nulls and the rest are YAML's as before.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["YAMLError", "load_yaml"]

YAMLError = yaml.YAMLError

_BOOL = "tag:yaml.org,2002:bool"


class _Yaml12BoolLoader(yaml.SafeLoader):
    """The safe loader with only YAML 1.2's true/false as booleans (see the module docstring)."""


# The resolver table is a class attribute shared with SafeLoader: copy it without the YAML 1.1 boolean
# rule rather than editing it in place, which would change every SafeLoader in the process.
_Yaml12BoolLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12BoolLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml(text: str | bytes) -> Any:
    """The plain data (dicts, lists, strings, numbers, booleans, None) `text` holds; raises YAMLError."""
    return yaml.load(text, Loader=_Yaml12BoolLoader)
