"""The arbiter's rules as the service compiles them: a suppression condition reads a named computed trait
of kind count or sum that a person lacks as 0, as journeys' conditions (`journeys.py`) and segments do, and
every start and replica compiles the same rules the same way.

Which computed traits are of kind count or sum comes from the profile service (ListComputedTraits, the
kinds `catalogue.profile_computed_traits` gives). The set a rules document was first compiled with - of the
computed traits its conditions read - is kept in `orchestration_rules`, under the document's digest
(`{"counted": [...], "at": ...}`; no personal data): a later start, or another replica, compiles that
document with it again, whether or not the profile service answers then, and whatever it says since (a
trait redefined later does not change rules already running, as it does not change a published journey
version). An edited rules file is another document: its set is asked for again. Until the profile service
has answered once for a document (not configured, or not answering at start), its conditions read those
traits as missing, as before, and nothing is kept, so the next start asks again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson

from cdp_kit.bus.consumer import describe_error
from cdp_kit.profile_fields import COMPUTED
from cdp_kit.storage import Put, Store
from cdp_orchestration.catalogue import ComputedTraits
from cdp_orchestration.domain.conditions import counted_fields
from cdp_orchestration.domain.rules import Rules, parse_rules

log = logging.getLogger("cdp.orchestration")

RULES = "orchestration_rules"  # rules document digest -> the counted fields it was compiled with


def digest(document: Any) -> str:
    """The key a rules document's counted set is kept under: the same for the same rules however written
    (key order, JSON or YAML)."""
    canonical = orjson.dumps(document, option=orjson.OPT_SORT_KEYS, default=str)
    return hashlib.sha256(canonical).hexdigest()


async def compile_rules(
    document: Any, store: Store, computed: ComputedTraits | None, field_name: str = "rules"
) -> Rules:
    """The rules `document` says (None: the defaults), their conditions reading the count / sum computed
    traits as 0 where a person has none: the set kept for this document, else the one the profile service
    gives now (then kept). InvalidArgument for a document that is not rules."""
    if document is None:
        return Rules()
    plain = parse_rules(document, field_name)
    reads = frozenset(f for f in plain.fields if f.startswith(COMPUTED + "."))
    if not reads:
        return plain
    key = digest(document)
    stored = await store.get(RULES, key)
    if stored is not None:
        counted = frozenset(stored.doc.get("counted") or ())
    else:
        ops = await _ops(computed)
        if ops is None:
            return plain
        counted = counted_fields(ops) & reads
        await store.bulk_write([Put(RULES, key, {"counted": sorted(counted), "at": time.time()})])
    return parse_rules(document, field_name, counted=counted) if counted else plain


async def _ops(computed: ComputedTraits | None) -> Mapping[str, str] | None:
    """The profile service's computed traits (name -> op); None when it cannot say now."""
    if computed is None:
        log.warning(
            "the arbiter's rules read computed traits and no profile service is configured (CDP_PROFILE_ADDRESS): "
            "a count or sum trait a person lacks reads as missing in them, not 0"
        )
        return None
    try:
        ops = await computed()
    except Exception as exc:
        log.warning(
            "the profile service did not list its computed traits (%s): the arbiter's rules read a count or sum "
            "trait a person lacks as missing until a start where it answers",
            describe_error(exc),
        )
        return None
    return ops if isinstance(ops, Mapping) else {}
