"""The second generated data set (cdp_testing.people_links): a CRM export and app sign-ups to link, with
large households and typo rates that vary from record to record."""

from __future__ import annotations

from collections import Counter

from cdp_testing.people import FIELDS
from cdp_testing.people_links import cross_source_pairs, generate_two_files


def test_two_files_are_shaped_as_a_crm_export_and_app_sign_ups():
    crm, app, truth = generate_two_files(3000, seed=5)
    assert generate_two_files(300, seed=5) == generate_two_files(300, seed=5)
    assert {r["source"] for r in crm} == {"crm"} and {r["source"] for r in app} == {"app"}
    assert all(set(r) == {"id", "source", *FIELDS} for r in crm + app)
    assert set(truth) == {r["id"] for r in crm + app}
    assert 0.75 < len(crm) / 3000 < 0.9 and 0.45 < len(app) / 3000 < 0.7
    links = cross_source_pairs(truth)
    assert all(a.startswith("app-") != b.startswith("app-") for a, b in links) and len(links) > 1000
    # Every sign-up has an e-mail; the app holds street addresses and birth dates less often than the CRM.
    assert all(r["email"] for r in app)
    share = lambda records, field: sum(bool(r[field]) for r in records) / len(records)  # noqa: E731
    assert share(app, "address") < share(crm, "address") - 0.3
    assert share(app, "dob") < share(crm, "dob") - 0.15
    # Households: many CRM addresses hold several different people.
    people_at = Counter()
    for address in {(r["address"], truth[r["id"]]) for r in crm if r["address"]}:
        people_at[address[0]] += 1
    assert sum(count >= 3 for count in people_at.values()) > 40


def test_typo_rates_vary_from_record_to_record():
    crm, app, truth = generate_two_files(3000, seed=6)
    first = {}
    for record in crm:
        first.setdefault(truth[record["id"]], record)
    # How far an app record's last name strays from the person's CRM one: mostly not at all, some a lot.
    changed = [
        record["last_name"].lower() != first[truth[record["id"]]]["last_name"].lower()
        for record in app
        if truth[record["id"]] in first and record["last_name"] and first[truth[record["id"]]]["last_name"]
    ]
    assert 0.03 < sum(changed) / len(changed) < 0.3
