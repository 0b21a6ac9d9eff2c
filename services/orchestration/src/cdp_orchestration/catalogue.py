"""The catalogue journeys are validated against (`domain.document.Catalogue`), from what is available.

Two sources, each optional, combined:

- a configured file (`CDP_ORCHESTRATION_CATALOGUE_FILE`, JSON or YAML), each key optional (absent: that
  part is not checked):

      events: ["Cart Abandoned", "Order Completed"]        # every event name there is
      segments: ["vip", "churn-risk"]
      purposes: ["Marketing", "Analytics"]
      fields: {"scores": ["churn_risk"], "computed": [...]} # known names under these roots only

- the profile service (`CDP_PROFILE_ADDRESS`): the computed traits it defines are the known
  `computed.<name>` fields, added to the file's.

A journey reading a field under a root the catalogue lists, with a name it does not know, is refused
with the node and field named (ValidateJourney, CreateJourney, UpdateJourney). When the profile service
cannot be asked the file's catalogue alone is used: an outage must not stop journeys being edited.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import orjson

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_kit.profile_fields import COMPUTED, ROOTS
from cdp_kit.yamltext import YAMLError, load_yaml
from cdp_orchestration.domain.document import Catalogue

log = logging.getLogger("cdp.orchestration.catalogue")

ComputedTraits = Callable[[], Awaitable[frozenset[str]]]


class CatalogueError(ValueError):
    """A catalogue file that cannot be used; the message names the file's key."""


def read_catalogue(path: str) -> Catalogue:
    text = Path(path).read_text()
    try:
        document = load_yaml(text) if path.endswith((".yaml", ".yml")) else orjson.loads(text)
    except (orjson.JSONDecodeError, YAMLError) as error:
        raise CatalogueError(f"{path}: not valid JSON or YAML: {error}") from None
    return parse_catalogue(document, path)


def parse_catalogue(document: Any, where: str = "catalogue") -> Catalogue:
    if not isinstance(document, Mapping):
        raise CatalogueError(f"{where}: must be a mapping with events, segments, purposes and/or fields")
    unknown = sorted(set(document) - {"events", "segments", "purposes", "fields"})
    if unknown:
        raise CatalogueError(f"{where}: unknown key {unknown[0]!r}; known: events, segments, purposes, fields")

    def names(key: str, value: Any) -> frozenset[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise CatalogueError(f"{where}: {key} must be a list of names")
        return frozenset(value)

    fields = document.get("fields") or {}
    if not isinstance(fields, Mapping) or not set(fields) <= set(ROOTS):
        raise CatalogueError(f"{where}: fields must map roots ({', '.join(ROOTS)}) to lists of names")
    return Catalogue(
        events=names("events", document["events"]) if "events" in document else None,
        segments=names("segments", document["segments"]) if "segments" in document else None,
        purposes=names("purposes", document["purposes"]) if "purposes" in document else None,
        names={root: names(f"fields.{root}", value) for root, value in fields.items()},
    )


def profile_computed_traits(channel: grpc.aio.Channel, token: str) -> ComputedTraits:
    stub = profile_pb2_grpc.ProfileServiceStub(channel)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def computed() -> frozenset[str]:
        response = await stub.ListComputedTraits(
            profile_pb2.ListComputedTraitsRequest(), metadata=metadata, timeout=5.0
        )
        return frozenset(t.definition.name for t in response.traits)

    return computed


class Catalogues:
    """The catalogue for the next validation: the configured one, with the profile's computed traits."""

    def __init__(self, configured: Catalogue | None = None, computed: ComputedTraits | None = None) -> None:
        self.configured = configured
        self.computed = computed

    async def current(self) -> Catalogue | None:
        catalogue = self.configured
        if self.computed is None:
            return catalogue
        try:
            known = await self.computed()
        except grpc.aio.AioRpcError as exc:
            log.warning("computed traits not read from the profile service (%s): not checked", exc.code().name)
            return catalogue
        base = catalogue or Catalogue()
        names = dict(base.names)
        names[COMPUTED] = names.get(COMPUTED, frozenset()) | known
        return Catalogue(base.events, base.fields, base.segments, base.purposes, names)
