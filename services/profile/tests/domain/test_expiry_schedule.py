"""The expiry schedule after events are applied: a person is due no later than the first time one of its
windowed computed values changes with no new event, whichever states the events fed (late events, events
already out of a window, expiry rounds in between)."""

from __future__ import annotations

import copy
import random

from cdp_profile.apply import apply_events
from cdp_profile.domain import Retention
from cdp_profile.expiry import expire
from cdp_profile.state import HotProfiles

DAY = 86400.0
HOUR = 3600.0

DEFS = [
    {"name": "orders_1h", "op": "count", "event_names": ["Order Completed"], "window": "1h"},
    {"name": "max_total_24h", "op": "max", "event_names": ["Order Completed"], "property": "total", "window": "24h"},
    {"name": "sections_7d", "op": "unique", "event_type": "page", "property": "section", "window": "7d"},
    {"name": "pages_2d", "op": "count", "event_type": "page", "window": "2d"},
    {"name": "revenue", "op": "sum", "event_names": ["Order Completed"], "property": "total"},
]


def test_a_person_is_due_no_later_than_a_windowed_value_changes(ev, defs_of):
    defs = defs_of(*DEFS)
    hot = HotProfiles(None, retention=Retention(max_events=1000, max_age_seconds=365 * DAY), owns=lambda _: True)
    rng = random.Random(11)
    persons = ["ann", "bob", "cy"]
    now = 100 * DAY
    checked = 0
    for batch in range(400):
        now += rng.choice([60.0, 20 * 60.0, 2 * HOUR, 10 * HOUR])
        items = []
        for i in range(rng.randint(1, 4)):
            at = now - rng.choice([0.0, 0.0, 30 * 60.0, 2 * HOUR, 20 * HOUR, 3 * DAY, 6 * DAY, 8 * DAY])
            if rng.random() < 0.5:
                event = ev(f"e{batch}-{i}", "track", "Order Completed", at, properties={"total": rng.randint(1, 50)})
            else:
                event = ev(f"e{batch}-{i}", "page", "Home", at, properties={"section": rng.choice("abcdef")})
            items.append((rng.choice(persons), event, now))
        apply_events(hot, items, defs, now=now)
        if rng.random() < 0.3:
            expire(hot.expiries, hot.profiles, defs, now=now)
        for person, profile in hot.profiles.items():
            due = profile.next_expiry()
            if due is not None:
                # At that time the schedule names the person (a copy: popping takes it off).
                assert person in copy.deepcopy(hot.expiries).pop_due(due), (batch, person)
                checked += 1
    assert checked > 600
