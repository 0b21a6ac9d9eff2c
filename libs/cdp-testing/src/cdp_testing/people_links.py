"""Two files to link, shaped unlike `generate_population`: a CRM export and an app's sign-ups.

`generate_two_files(n_people)` draws people with the same names, addresses and phones as
`cdp_testing.people`, but lets households be common and large (families and flat-shares: a quarter of
people live with someone already drawn, several to an address, usually sharing the surname and often the
landline), and writes them into two sources whose records differ the way the two systems do:

- source "crm" (a CRM export, entered by staff): most people, once each (a few twice), full names as
  written, the household landline, the full address, usually the date of birth; few typos.
- source "app" (app sign-ups, typed on a phone): a share of the CRM's people plus people the CRM never
  saw; always an e-mail (often a newer one), a mobile number more often than the landline, nicknames,
  lower case, no street address half the time, the date of birth less often and with day/month swaps.

Each record's typo rate is drawn on its own (most records are clean, some are very noisy), so the typo
rate varies across records and not only across fields. Records carry "source"; the truth maps record
id -> person key as in `generate_population`, and `cross_source_pairs` gives the pairs a link must find.
"""

from __future__ import annotations

import random
from dataclasses import replace

from .people import NoiseRates, Person, _PopulationGenerator, true_pairs

SOURCES = ("crm", "app")


def _typo_rate(rng: random.Random, *, noisy_share: float, noisy_rate: float, clean_rate: float) -> float:
    """A record's own typo rate: most records come from careful hands, a share from careless ones."""
    return rng.uniform(noisy_rate / 2, noisy_rate) if rng.random() < noisy_share else rng.uniform(0, clean_rate)


def _crm_record(generator: _PopulationGenerator, rng: random.Random, person: Person) -> dict:
    generator.noise = NoiseRates(
        typo=_typo_rate(rng, noisy_share=0.1, noisy_rate=0.2, clean_rate=0.03),
        nickname=0.05,
        swapped_names=0.01,
        missing=0.05,
        email_variant=0.05,
        different_email=0.1,
        phone_format=0.2,
        different_phone=0.05,
        dob_swap=0.01,
        dob_component_typo=0.02,
        address_variant=0.3,
        moved=0.0,
    )
    record = generator.noisy_record(person)
    if rng.random() < 0.12:
        record["dob"] = None  # not every CRM contact has a birthday on file
    return record


def _app_record(generator: _PopulationGenerator, rng: random.Random, person: Person) -> dict:
    generator.noise = NoiseRates(
        typo=_typo_rate(rng, noisy_share=0.3, noisy_rate=0.35, clean_rate=0.08),
        nickname=0.3,
        swapped_names=0.04,
        missing=0.08,
        email_variant=0.2,
        different_email=0.3,
        phone_format=0.9,
        different_phone=0.55,  # a mobile number instead of the household's landline
        dob_swap=0.08,
        dob_component_typo=0.05,
        address_variant=0.7,
        moved=0.1,
    )
    record = generator.noisy_record(person)
    if not record["email"]:
        record["email"] = generator._email(person.first_name, person.last_name)  # sign-up needs one
    if rng.random() < 0.45:
        record["first_name"] = (record["first_name"] or "").lower() or None
        record["last_name"] = (record["last_name"] or "").lower() or None
    if rng.random() < 0.5:
        record["address"] = None
    if rng.random() < 0.3:
        record["dob"] = None
    if rng.random() < 0.2:
        record["city"] = None
    return record


def generate_two_files(
    n_people: int,
    *,
    crm_share: float = 0.8,
    app_share_of_crm: float = 0.55,
    app_only_share: float = 0.15,
    household_rate: float = 0.25,
    crm_duplicate_rate: float = 0.03,
    seed: int = 0,
) -> tuple[list[dict], list[dict], dict[str, str]]:
    """(crm records, app records, truth). `crm_share` of the people are in the CRM, `app_share_of_crm` of
    those signed up in the app too, and `app_only_share` of all people are in the app alone. Household
    members join a recent household (several people per address). Same seed, same output."""
    if n_people < 0:
        raise ValueError(f"n_people must be >= 0, got {n_people}")
    rng = random.Random(seed)
    generator = _PopulationGenerator(rng, NoiseRates())
    people: list[Person] = []
    for index in range(n_people):
        key = f"h{index:06d}"
        if people and rng.random() < household_rate:
            # Households fill up: a recent person's, so a family of four shares one address.
            head = people[max(0, len(people) - 1 - int(rng.expovariate(0.2)))]
            mate = generator.housemate(key, head)
            if rng.random() < 0.6:
                mate = replace(mate, phone_digits=head.phone_digits)  # the family landline
            people.append(mate)
        else:
            people.append(generator.person(key))

    crm: list[tuple[dict, str]] = []
    app: list[tuple[dict, str]] = []
    for person in people:
        in_crm = rng.random() < crm_share
        if in_crm:
            crm.append((_crm_record(generator, rng, person), person.key))
            if rng.random() < crm_duplicate_rate:
                crm.append((_crm_record(generator, rng, person), person.key))
        if (in_crm and rng.random() < app_share_of_crm) or (
            not in_crm and rng.random() < app_only_share / max(1 - crm_share, 1e-9)
        ):
            app.append((_app_record(generator, rng, person), person.key))
    rng.shuffle(crm)
    rng.shuffle(app)

    truth: dict[str, str] = {}
    files = []
    for source, rendered in zip(SOURCES, (crm, app), strict=True):
        records = []
        for index, (fields, person_key) in enumerate(rendered):
            record_id = f"{source}-{index:07d}"
            records.append({"id": record_id, "source": source, **fields})
            truth[record_id] = person_key
        files.append(records)
    return files[0], files[1], truth


def cross_source_pairs(truth: dict[str, str]) -> set[tuple[str, str]]:
    """The true pairs of one CRM and one app record (smaller id first): what a link must find."""
    return {(a, b) for a, b in true_pairs(truth) if a.split("-", 1)[0] != b.split("-", 1)[0]}
