"""Profile rules as plain Python: no gRPC, no NATS, no store.

- `events`: what profiles are built from (`ProfileEvent`), the timeline they leave, `Retention`.
- `history`: versioned facts with provenance (`TraitVersion`, `ConsentState`, `Score`).
- `computed`: computed trait definitions (`ComputedTrait`), their index (`ComputedTraits`) and the
  pseudo-paths (`$at`, `$hour`, `$context.<path>`, `$user_id`, `$anonymous_id`, `$shared.<type>`) they may read.
- `aggregates`: the mergeable, expirable state behind each computed trait.
- `profile`: `Profile` (apply, merge, split, expire, view, export, persistence).
- `change`: `ProfileChange` (what a call changed) and `ProfileView` (what the person looks like).
"""

from cdp_profile.domain.change import ProfileChange, ProfileView
from cdp_profile.domain.computed import OPS, ComputedTrait, ComputedTraits, parse_window
from cdp_profile.domain.events import DEFAULT_RETENTION, EVENT_TYPES, ProfileEvent, Retention, TimelineEntry
from cdp_profile.domain.history import ConsentState, Score, TraitVersion
from cdp_profile.domain.profile import MergeRecord, Profile

__all__ = [
    "DEFAULT_RETENTION",
    "EVENT_TYPES",
    "OPS",
    "ComputedTrait",
    "ComputedTraits",
    "ConsentState",
    "MergeRecord",
    "Profile",
    "ProfileChange",
    "ProfileEvent",
    "ProfileView",
    "Retention",
    "Score",
    "TimelineEntry",
    "TraitVersion",
    "parse_window",
]
