"""What a training job's unexpected failure tells the operator who ran it: the error's type and where it
was raised, never its text (which quotes what the code had in hand)."""

from __future__ import annotations

from cdp_kit.errors import InvalidArgument
from cdp_scoring.worker import _error_doc, _error_from


def _raised(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as caught:
        return caught


def test_an_unexpected_error_is_told_by_its_type_and_place_not_its_text():
    doc = _error_doc(_raised(KeyError("ada@example.com")))
    assert "ada@example.com" not in doc["message"]
    assert doc["message"].startswith("KeyError at test_worker_errors.py:")
    assert "ada@example.com" not in str(_error_from(doc))


def test_bad_input_still_names_its_field():
    doc = _error_doc(InvalidArgument("cutoff", "must be in the past"))
    assert (doc["field"], doc["message"]) == ("cutoff", "must be in the past")
