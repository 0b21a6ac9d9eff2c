from __future__ import annotations

from datetime import date, datetime

import pytest

from cdp_identity.matching.normalise import (
    UnparseableValue,
    normalise_address,
    normalise_date,
    normalise_digits,
    normalise_email,
    normalise_name,
    normalise_number,
    normalise_text,
    phone_normaliser,
)


@pytest.mark.parametrize("missing", [None, "", "   ", "\t\n"])
def test_every_normaliser_treats_blank_as_missing(missing):
    normalisers = [normalise_text, normalise_name, normalise_email, normalise_address, normalise_digits]
    normalisers += [normalise_date, normalise_number, phone_normaliser("US")]
    assert all(normalise(missing) is None for normalise in normalisers)


def test_names_fold_case_accents_and_punctuation():
    assert normalise_name("  JOSÉ ") == "jose"
    assert normalise_name("Zoë") == normalise_name("Zoe") == "zoe"
    assert normalise_name("O'Brien") == "obrien"
    assert normalise_name("Smith-Jones") == "smith jones"
    assert normalise_name("Müller") == "muller"


def test_text_keeps_accents_but_folds_case_and_width():
    assert normalise_text("\uff21\uff22\uff23  Straße")  # full-width ABC == "abc strasse"
    assert normalise_text("José") == "josé"


def test_email_variants_collapse_to_one_mailbox():
    canonical = normalise_email("john.smith@gmail.com")
    assert canonical == "johnsmith@gmail.com"
    assert normalise_email(" John.Smith@GMAIL.com ") == canonical
    assert normalise_email("johnsmith+shop@gmail.com") == canonical
    assert normalise_email("john.smith@yahoo.com") != canonical
    assert normalise_email("not-an-email") == "not-an-email"


def test_phone_formats_become_the_national_number():
    normalise = phone_normaliser("US")
    formats = ["(415) 555-0134", "415-555-0134", "+1 415 555 0134", "4155550134", "415.555.0134", "1-415-555-0134"]
    assert {normalise(value) for value in formats} == {"4155550134"}
    assert normalise("+49 30 1234567") == "301234567"
    assert normalise("12") == "12"  # not a phone number: its digits still compare with themselves


def test_address_abbreviations_and_formatting():
    canonical = normalise_address("12 Maple Avenue Apt 3")
    assert canonical == "12 maple ave apt 3"
    for variant in ["12 Maple Ave. Apt. 3", "12, MAPLE AVE #3", "12 maple av unit 3", "0012 Maple Avenue Suite 3"]:
        assert normalise_address(variant) == canonical


def test_dates_parse_in_the_documented_formats():
    assert normalise_date("1985-3-7") == "1985-03-07"
    assert normalise_date("1985-03-07T12:30:00Z") == "1985-03-07"
    assert normalise_date("19850307") == "1985-03-07"
    assert normalise_date("1985/03/07") == normalise_date("1985.03.07") == "1985-03-07"
    assert normalise_date(date(1985, 3, 7)) == "1985-03-07"
    assert normalise_date(datetime(1985, 3, 7, 12, 30)) == "1985-03-07"


@pytest.mark.parametrize("value", ["1985-02-30", "07/03/1985", "1985030", "yesterday", "19851307", "1985-03"])
def test_a_date_that_does_not_parse_is_refused_not_dropped(value):
    with pytest.raises(UnparseableValue) as raised:
        normalise_date(value)
    assert "YYYY-MM-DD" in str(raised.value)  # says what would be accepted...
    assert str(value) not in str(raised.value)  # ...without repeating a birth date into logs


def test_numbers_and_digits():
    assert normalise_number("3") == normalise_number(3.0) == normalise_number(" 3.0 ") == "3"
    assert normalise_number("2.5") == "2.5"
    assert normalise_number("abc") is None
    assert normalise_number(True) is None
    assert normalise_digits("021-47") == "02147"
