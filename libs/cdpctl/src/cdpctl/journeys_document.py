"""A journey document as `cdpctl journey validate|create|update FILE` reads it: the file's text sent in the
form its name says (the service parses it, so its errors name the node and field), and the journey's id
read from it (`update` names the journey the file names).

YAML is read as orchestration reads journey YAML: YAML 1.2's booleans only, so on/off/yes/no/y/n stay words
(a node id `no`, an answer `yes`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import yaml

from cdp.orchestration.v1 import orchestration_pb2 as pb
from cdp_kit.yamltext import load_yaml

_NOT_UTF8 = "cannot read {file}: not UTF-8 text (save it as UTF-8)"


def read_definition(file: str) -> pb.JourneyDefinition:
    """The file's text in the form its name says (.yaml/.yml: YAML, else JSON); `-` reads stdin as JSON
    unless it starts like YAML would. The service parses it: its errors name the node and field."""
    if file == "-":
        try:
            text = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError:
            raise click.BadParameter(_NOT_UTF8.format(file="stdin"), param_hint="FILE") from None
        return pb.JourneyDefinition(json=text) if text.lstrip().startswith("{") else pb.JourneyDefinition(yaml=text)
    path = Path(file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise click.BadParameter(f"cannot read {file}: {exc.strerror}", param_hint="FILE") from None
    except UnicodeDecodeError:
        # A file saved as UTF-16 (some Windows editors' "Unicode") ended in a traceback.
        raise click.BadParameter(_NOT_UTF8.format(file=file), param_hint="FILE") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        return pb.JourneyDefinition(yaml=text)
    return pb.JourneyDefinition(json=text)


def journey_id_of(definition: pb.JourneyDefinition, file: str) -> str:
    text = definition.yaml or definition.json
    try:
        document = load_yaml(text)  # orchestration's reader (YAML is a superset of JSON: one reader for both)
    except yaml.YAMLError as exc:
        raise click.BadParameter(f"{file} is not JSON or YAML: {exc}", param_hint="FILE") from None
    journey_id = document.get("id") if isinstance(document, dict) else None
    if not isinstance(journey_id, str) or not journey_id:
        raise click.BadParameter(f"{file} names no journey: its `id` field is missing", param_hint="FILE")
    return journey_id
