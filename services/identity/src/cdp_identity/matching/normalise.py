"""Value normalisers: turn a raw field value into the canonical string that comparisons and blocking use.

Each normaliser returns None for a missing value (None, empty or blank), so "missing" means the same
thing everywhere. They are deliberately conservative: they remove formatting, never information a
comparison level could use.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from datetime import date

import phonenumbers

Normaliser = Callable[[object], str | None]


class UnparseableValue(ValueError):
    """A present value that a typed normaliser cannot read; the message says what is accepted and never
    repeats the value (it is personal data and error messages get logged)."""


_WHITESPACE = re.compile(r"\s+")
# \u2019 is the typographic apostrophe that word processors put into names like O'Brien.
_NAME_PUNCTUATION = re.compile("[.'`\u2019\\-_,]")
_ADDRESS_PUNCTUATION = re.compile("[.,;:'`\u2019\"]")
_NON_DIGITS = re.compile(r"\D")
_LEADING_ZEROS = re.compile(r"\b0+(\d)")
# A separator, then optionally a time ("T12:30:00Z", " 12:30"): the date part is what counts.
_ISO_DATE = re.compile(r"^(?P<year>\d{4})(?P<sep>[-/.])(?P<month>\d{1,2})(?P=sep)(?P<day>\d{1,2})(?:$|[t ])")
_COMPACT_DATE = re.compile(r"^(?P<year>\d{4})(?P<month>\d{2})(?P<day>\d{2})\Z")

# USPS street suffix and unit designator abbreviations: the variants real address data mixes.
_ADDRESS_TOKENS = {
    "street": "st",
    "str": "st",
    "avenue": "ave",
    "av": "ave",
    "road": "rd",
    "boulevard": "blvd",
    "drive": "dr",
    "lane": "ln",
    "court": "ct",
    "place": "pl",
    "way": "way",
    "wy": "way",
    "terrace": "ter",
    "parkway": "pkwy",
    "highway": "hwy",
    "circle": "cir",
    "square": "sq",
    "north": "n",
    "south": "s",
    "east": "e",
    "west": "w",
    "apartment": "apt",
    "unit": "apt",
    "suite": "apt",
    "ste": "apt",
    "#": "apt",
    "no": "",
}


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", str(value))).strip().casefold()
    return text or None


def normalise_text(value: object) -> str | None:
    """Unicode NFKC, case-folded, whitespace collapsed."""
    return _text(value)


def normalise_name(value: object) -> str | None:
    """Text without accents and name punctuation: "O'Brien-Smith" -> "obrien smith", "José" -> "jose"."""
    text = _text(value)
    if text is None:
        return None
    decomposed = unicodedata.normalize("NFKD", text)
    without_accents = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    cleaned = _NAME_PUNCTUATION.sub(lambda m: " " if m.group() in "-_," else "", without_accents)
    return _WHITESPACE.sub(" ", cleaned).strip() or None


def normalise_email(value: object) -> str | None:
    """Lower-cased address with the local part's dots and +tag removed (how most providers route mail)."""
    text = _text(value)
    if text is None:
        return None
    local, at, domain = text.replace(" ", "").rpartition("@")
    if not at or not local:
        return text.replace(" ", "") or None
    local = local.split("+", 1)[0].replace(".", "")
    return f"{local}@{domain}" if local else None


def phone_normaliser(default_region: str | None) -> Normaliser:
    """Phone numbers as their national significant number, so "+1 415 555 0134" == "(415) 555-0134".

    Numbers that do not parse keep their digits, so a malformed number can still match itself.
    """

    def normalise_phone(value: object) -> str | None:
        text = _text(value)
        if text is None:
            return None
        digits = _NON_DIGITS.sub("", text)
        if not digits:
            return None
        try:
            number = phonenumbers.parse(text, default_region)
        except phonenumbers.NumberParseException:
            return digits
        return phonenumbers.national_significant_number(number)

    return normalise_phone


def normalise_address(value: object) -> str | None:
    """Street address with standard abbreviations: "12, Maple Avenue Apt. 3" -> "12 maple ave apt 3"."""
    text = _text(value)
    if text is None:
        return None
    text = _ADDRESS_PUNCTUATION.sub(" ", text).replace("#", " # ")
    tokens = [_ADDRESS_TOKENS.get(token, token) for token in text.split()]
    joined = " ".join(token for token in tokens if token)
    # "0012 main st" -> "12 main st"
    return _LEADING_ZEROS.sub(r"\1", joined) or None


def normalise_digits(value: object) -> str | None:
    """Digits only (postal codes, national ids): "021-47" -> "02147"."""
    text = _text(value)
    if text is None:
        return None
    return _NON_DIGITS.sub("", text) or None


DATE_FORMATS = "YYYY-MM-DD (a time may follow, as in ISO 8601), YYYYMMDD, YYYY/MM/DD or YYYY.MM.DD"


def normalise_date(value: object) -> str | None:
    """ISO date "YYYY-MM-DD" from one of DATE_FORMATS or a date/datetime object.

    Anything else is refused (UnparseableValue), never treated as missing: a birth date read as missing
    silently loses the strongest evidence a pair has. Day-first and month-first forms (07/03/1985) are
    ambiguous, so they are refused too rather than guessed.
    """
    if isinstance(value, date):
        return value.isoformat()[:10]
    text = _text(value)
    if text is None:
        return None
    match = _ISO_DATE.match(text) or _COMPACT_DATE.match(text)
    if match is None:
        raise UnparseableValue(f"is not a date; accepted: {DATE_FORMATS}")
    year, month, day = (int(match.group(part)) for part in ("year", "month", "day"))
    try:
        return date(year, month, day).isoformat()
    except ValueError:
        raise UnparseableValue(
            f"is not a calendar date (month 1-12, a day the month has); accepted: {DATE_FORMATS}"
        ) from None


def normalise_number(value: object) -> str | None:
    """A number in canonical form ("3", "3.0" and " 3 " are equal); not a number counts as missing."""
    if isinstance(value, bool):
        return None
    text = _text(value)
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    if number != number or number in (float("inf"), float("-inf")):
        return None
    return repr(int(number)) if number.is_integer() else repr(number)


def normalise_raw(value: object) -> str | None:
    """The value as a string, untouched except that empty means missing."""
    if value is None:
        return None
    text = str(value)
    return text if text.strip() else None


NORMALISERS: dict[str, Normaliser] = {
    "text": normalise_text,
    "name": normalise_name,
    "email": normalise_email,
    "address": normalise_address,
    "digits": normalise_digits,
    "date": normalise_date,
    "number": normalise_number,
    "none": normalise_raw,
}
"""Every normaliser by its config name; "phone" is built per region by `phone_normaliser`."""

NORMALISER_NAMES = (*sorted(NORMALISERS), "phone")


def get_normaliser(name: str, *, region: str | None = None) -> Normaliser:
    if name == "phone":
        return phone_normaliser(region)
    return NORMALISERS[name]
