"""Mapping documents: a CRM administrator's connections, validated whole, and what a person projects to."""

from __future__ import annotations

import pytest

from cdp_crm.domain.mapping import MappingInvalid, ObjectSchema, load_connections, parse_connections
from cdp_crm.domain.projection import (
    Projection,
    Skipped,
    Source,
    changed_fields,
    cleared,
    in_scope,
    project,
    reads,
    touches,
)

HUBSPOT_CONTACTS = ObjectSchema.of(
    "contacts",
    ["email", "firstname", "lifecyclestage", "cdp_churn_risk", "cdp_segments", "cdp_consent_email"],
    keys=["email", "cdp_id"],
)
HUBSPOT_TASKS = ObjectSchema.of("tasks", ["hs_task_subject", "hs_task_body"], keys=["cdp_idempotency_key"])
SCHEMAS = {"hubspot": {"contacts": HUBSPOT_CONTACTS, "tasks": HUBSPOT_TASKS}}


def _document(**overrides):
    contacts = {
        "id": "contacts",
        "object": "contacts",
        "match": {"cdp_id": "person.id"},
        "fields": {
            "email": "traits.email",
            "firstname": {"source": "traits.first_name", "transform": "trim"},
            "cdp_churn_risk": {"source": "scores.churn_risk", "transform": "round:2"},
            "cdp_consent_email": "consent.purpose:email",
            "cdp_segments": {"source": "segments", "transform": "join:;"},
            "lifecyclestage": {"value": "customer"},
        },
    }
    contacts.update(overrides)
    return {
        "connections": [
            {
                "id": "hubspot",
                "kind": "hubspot",
                "credentials": {"token": "HUBSPOT_TOKEN"},
                "mappings": [
                    contacts,
                    {
                        "id": "churn-task",
                        "object": "tasks",
                        "action": "task",
                        "idempotency_field": "cdp_idempotency_key",
                        "fields": {"hs_task_subject": "action.subject", "hs_task_body": "action.body"},
                    },
                ],
            }
        ]
    }


def _problems(document, schemas=SCHEMAS):
    with pytest.raises(MappingInvalid) as caught:
        parse_connections(document, schemas)
    return {p.path: p.message for p in caught.value.problems}


def test_a_valid_document_reads_with_defaults_for_mode_triggers_and_account():
    (connection,) = parse_connections(_document(), SCHEMAS)
    contacts = connection.mapping("contacts")
    assert connection.account == "hubspot" and connection.credentials == {"token": "HUBSPOT_TOKEN"}
    assert contacts.mode == "upsert" and contacts.triggers == {"profiles.changed", "backfill"}
    assert connection.mapping("churn-task").triggers == {"actions.crm"}


def test_yaml_and_json_read_the_same():
    yaml_text = """
connections:
  - id: hubspot
    kind: hubspot
    credentials: {token: HUBSPOT_TOKEN}
    mappings:
      - id: contacts
        object: contacts
        match: {cdp_id: person.id}
        fields: {email: traits.email}
"""
    (connection,) = load_connections(yaml_text, SCHEMAS, form="yaml")
    assert connection.mapping("contacts").fields[0].source == "traits.email"
    with pytest.raises(MappingInvalid) as caught:
        load_connections("{not json", form="json")
    assert caught.value.field == "connections"


def test_yaml_words_stay_words_and_true_false_map_keys_match_booleans():
    # YAML 1.1 would read yes/no/on/off as booleans: the `map` below would turn into {True: ..., False: ...}
    # and a plan called "yes" would never match. Only true/false are booleans, and a boolean trait finds its
    # `true:` / `false:` entry as it does written in JSON ("true").
    yaml_text = """
connections:
  - id: hubspot
    kind: hubspot
    credentials: {token: HUBSPOT_TOKEN}
    mappings:
      - id: contacts
        object: contacts
        match: {cdp_id: person.id}
        fields:
          lifecyclestage: {source: traits.newsletter, map: {yes: subscriber, no: lead, on: customer}}
          cdp_consent_email: {source: traits.opted_in, map: {true: Y, false: N}}
          firstname: {value: off}
"""
    (connection,) = load_connections(yaml_text, SCHEMAS, form="yaml")
    contacts = connection.mapping("contacts")

    def fields(newsletter, opted_in):
        person = Source("p-1", {"traits.newsletter": newsletter, "traits.opted_in": opted_in})
        return project(contacts, person).fields

    assert fields("yes", True) == {"lifecyclestage": "subscriber", "cdp_consent_email": "Y", "firstname": "off"}
    assert fields("no", False) == {"lifecyclestage": "lead", "cdp_consent_email": "N", "firstname": "off"}
    assert fields("on", False)["lifecyclestage"] == "customer"


def test_every_problem_is_reported_at_once_each_naming_mapping_and_field():
    document = _document(
        mode="sometimes",
        fields={
            "firstnme": "traits.first_name",  # not in the CRM's schema
            "email": "profile.email",  # not a source
            "cdp_churn_risk": {"source": "scores.churn_risk", "transform": "round:two"},
        },
    )
    problems = _problems(document)
    assert set(problems) == {
        "hubspot/contacts.mode",
        "hubspot/contacts.fields.firstnme",
        "hubspot/contacts.fields.email.source",
        "hubspot/contacts.fields.cdp_churn_risk.transform",
    }
    assert "did you mean 'firstname'" in problems["hubspot/contacts.fields.firstnme"]


def test_an_unknown_field_is_only_caught_against_the_described_schema():
    document = _document(fields={"favourite_colour": "traits.colour"})
    assert parse_connections(document)  # no schema: nothing to check the field against
    assert "is not a field of contacts" in _problems(document)["hubspot/contacts.fields.favourite_colour"]


def test_the_match_key_must_be_a_key_of_the_crm_object():
    problems = _problems(_document(match={"firstname": "traits.first_name"}))
    assert "not an external id, unique property or alternate key" in problems["hubspot/contacts.match.firstname"]
    assert "upsert by that key" in _problems(_document(match=None))["hubspot/contacts.match"]
    hubspot_two_keys = _problems(_document(match={"cdp_id": "person.id", "email": "traits.email"}))
    assert "at most 1" in hubspot_two_keys["hubspot/contacts.match"]


def test_credentials_are_environment_variable_names_and_a_pasted_secret_is_not_echoed():
    document = _document()
    document["connections"][0]["credentials"] = {"token": "pat-na1-0123456789abcdef"}
    problems = _problems(document)
    message = problems["hubspot.credentials.token"]
    assert "NAME of an environment variable" in message and "pat-na1" not in message
    document["connections"][0]["credentials"] = {"client_id": "HS_ID"}
    problems = _problems(document)
    assert "hubspot.credentials.client_id" in problems and "needs {token}" in problems["hubspot.credentials"]


def test_salesforce_accepts_either_client_credentials_or_the_jwt_bearer_flow():
    def sf(credentials):
        return {
            "connections": [
                {
                    "id": "sf",
                    "kind": "salesforce",
                    "credentials": credentials,
                    "mappings": [
                        {
                            "id": "c",
                            "object": "Contact",
                            "match": {"CDP_Id__c": "person.id"},
                            "fields": {"Email": "traits.email"},
                        }
                    ],
                }
            ]
        }

    assert parse_connections(sf({"client_id": "SF_ID", "client_secret": "SF_SECRET"}))
    assert parse_connections(sf({"client_id": "SF_ID", "username": "SF_USER", "private_key": "SF_KEY"}))
    with pytest.raises(MappingInvalid):
        parse_connections(sf({"client_id": "SF_ID", "username": "SF_USER"}))


def test_action_and_list_mappings_have_their_own_rules():
    document = _document()
    document["connections"][0]["mappings"].append(
        {
            "id": "vip",
            "object": "contacts",
            "list": "VIP",
            "match": {"cdp_id": "person.id"},
            "triggers": ["actions.crm"],
        }
    )
    task = document["connections"][0]["mappings"][1]
    task["mode"] = "mirror"
    del task["idempotency_field"]
    problems = _problems(document)
    assert "needs the segment" in problems["hubspot/vip.segment"]
    assert "hubspot/vip.triggers[0]" in problems
    assert "hubspot/churn-task.mode" in problems and "hubspot/churn-task.idempotency_field" in problems
    document = _document()
    document["connections"][0]["mappings"][1]["action"] = "churn_followup"
    assert "task, case" in _problems(document)["hubspot/churn-task.action"]
    document = _document(fields={"email": "action.email"})
    assert "only in action mappings" in _problems(document)["hubspot/contacts.fields.email.source"]


def test_two_connections_on_one_account_must_be_the_same_crm():
    document = _document()
    other = {
        "id": "zoho",
        "kind": "zoho",
        "account": "hubspot",
        "credentials": {"client_id": "Z_ID", "client_secret": "Z_S", "refresh_token": "Z_R"},
        "mappings": [
            {
                "id": "c",
                "object": "Contacts",
                "match": {"Email": "traits.email"},
                "fields": {"Last_Name": "traits.last_name"},
            }
        ],
    }
    document["connections"].append(other)
    assert "zoho.account" in _problems(document)


PERSON = Source(
    "person-1",
    {
        "traits.email": "ada@example.com",
        "traits.first_name": "  Ada ",
        "scores.churn_risk": 0.87321,
        "consent.purpose:email": True,
    },
    frozenset({"vip", "at_risk"}),
)


def test_a_person_projects_to_the_record_keyed_by_the_match_field():
    (connection,) = parse_connections(_document(), SCHEMAS)
    projection = project(connection.mapping("contacts"), PERSON)
    assert isinstance(projection, Projection)
    assert projection.key_values == {"cdp_id": "person-1"}
    assert projection.fields == {
        "email": "ada@example.com",
        "firstname": "Ada",
        "cdp_churn_risk": 0.87,
        "cdp_consent_email": True,
        "cdp_segments": "at_risk;vip",
        "lifecyclestage": "customer",
    }


def test_upsert_leaves_a_missing_value_alone_and_mirror_clears_it():
    (connection,) = parse_connections(_document(), SCHEMAS)
    without_score = Source("person-1", {"traits.email": "ada@example.com"})
    assert "cdp_churn_risk" not in project(connection.mapping("contacts"), without_score).fields
    (mirrored,) = parse_connections(_document(mode="mirror"), SCHEMAS)
    assert project(mirrored.mapping("contacts"), without_score).fields["cdp_churn_risk"] is None


def test_a_missing_match_key_skips_the_person_instead_of_writing_a_keyless_record():
    (connection,) = parse_connections(_document(match={"email": "traits.email"}), SCHEMAS)
    assert project(connection.mapping("contacts"), Source("p2", {})) == Skipped("hubspot/contacts", "match.email")


def test_only_a_change_to_a_mapped_field_needs_a_write():
    (connection,) = parse_connections(_document(), SCHEMAS)
    contacts = connection.mapping("contacts")
    assert touches(contacts, {"scores.churn_risk"}) and touches(contacts, {"segments.new_segment"})
    assert not touches(contacts, {"traits.shoe_size", "computed.orders_90d"})
    assert "person.id" not in reads(contacts)
    before = project(contacts, PERSON)
    tiny = Source(PERSON.person_id, {**PERSON.profile, "scores.churn_risk": 0.8701}, PERSON.segments)
    assert changed_fields(before, project(contacts, tiny)) == {}  # rounds to the same value: no API call
    moved = Source(PERSON.person_id, {**PERSON.profile, "scores.churn_risk": 0.91}, PERSON.segments)
    assert changed_fields(before, project(contacts, moved)) == {"cdp_churn_risk": 0.91}
    assert changed_fields(None, before) == dict(before.fields)


def test_an_action_projects_to_a_task_keyed_by_the_action_so_a_retry_is_the_same_task():
    (connection,) = parse_connections(_document(), SCHEMAS)
    task = connection.mapping("churn-task")
    action = {"id": "act-42", "subject": "Call Ada", "body": "churn risk 0.87"}
    first = project(task, Source("person-1", action=action))
    again = project(task, Source("person-1", action=dict(action)))
    assert first.key == again.key and first.key[0][0] == "cdp_idempotency_key"
    other = project(task, Source("person-1", action={**action, "id": "act-43"}))
    assert other.key != first.key
    assert first.fields == {"hs_task_subject": "Call Ada", "hs_task_body": "churn risk 0.87"}


def test_what_an_adapter_cannot_write_yet_is_refused_at_start():
    document = {
        "connections": [
            {
                "id": "zoho",
                "kind": "zoho",
                "credentials": {"client_id": "Z_ID", "client_secret": "Z_S", "refresh_token": "Z_R"},
                "mappings": [
                    {
                        "id": "c",
                        "object": "Contacts",
                        "mode": "update_only",
                        "match": {"Email": "traits.email"},
                        "fields": {"Last_Name": "traits.last_name"},
                    },
                    {
                        "id": "vip",
                        "object": "Contacts",
                        "segment": "vip",
                        "list": "VIP",
                        "match": {"Email": "traits.email"},
                    },
                ],
            }
        ]
    }
    problems = _problems(document, {})
    assert "update_only is not supported for zoho" in problems["zoho/c.mode"]
    assert "zoho/vip.list" not in problems  # campaign membership: the Campaign's related list


def test_a_task_links_to_the_persons_record_of_the_mapping_it_names():
    document = _document()
    task = document["connections"][0]["mappings"][1]
    task["about"] = {"mapping": "contacts"}
    (connection,) = parse_connections(document, SCHEMAS)
    projection = project(
        connection.mapping("churn-task"), Source("person-1", action={"id": "a1"}), connection.mapping("contacts")
    )
    assert projection.link.object == "contacts" and projection.link.key == (("cdp_id", "person-1"),)
    task["about"] = {"mapping": "churn-task"}
    assert "must name a record mapping" in _problems(document)["hubspot/churn-task.about.mapping"]
    document["connections"][0]["mappings"][0]["about"] = {"mapping": "contacts"}
    assert "only action mappings" in _problems(document)["hubspot/contacts.about"]


def test_salesforce_and_dynamics_links_name_their_field():
    document = {
        "connections": [
            {
                "id": "sf",
                "kind": "salesforce",
                "credentials": {"client_id": "A", "client_secret": "B"},
                "mappings": [
                    {
                        "id": "c",
                        "object": "Contact",
                        "match": {"CDP_Id__c": "person.id"},
                        "fields": {"LastName": "traits.last_name"},
                    },
                    {
                        "id": "t",
                        "object": "Task",
                        "action": "task",
                        "idempotency_field": "K__c",
                        "about": {"mapping": "c"},
                        "fields": {"Subject": "action.subject"},
                    },
                ],
            }
        ]
    }
    assert "WhoId" in _problems(document, {})["sf/t.about.field"]


def test_a_dynamics_connection_needs_its_environment_url():
    document = {
        "connections": [
            {
                "id": "dyn",
                "kind": "dynamics",
                "credentials": {"tenant_id": "T", "client_id": "C", "client_secret": "S"},
                "mappings": [
                    {
                        "id": "c",
                        "object": "contacts",
                        "match": {"cdp_id": "person.id"},
                        "fields": {"lastname": "traits.last_name"},
                    }
                ],
            }
        ]
    }
    assert "environment's URL" in _problems(document, {})["dyn.url"]


def test_a_record_mapping_scoped_to_a_segment_follows_entries_and_exits_by_default():
    (connection,) = parse_connections(_document(segment="at_risk", mode="mirror"), SCHEMAS)
    assert connection.mapping("contacts").triggers == {
        "profiles.changed",
        "segments.entered",
        "segments.exited",
        "backfill",
    }


def test_a_list_mapping_writes_membership_only():
    document = _document()
    document["connections"][0]["mappings"].append(
        {
            "id": "vip",
            "object": "contacts",
            "segment": "vip",
            "list": "1",
            "mode": "update_only",
            "match": {"cdp_id": "person.id"},
            "fields": {"email": "traits.email"},
        }
    )
    problems = _problems(document)
    assert "hubspot/vip.mode" in problems and "record mapping" in problems["hubspot/vip.fields"]


def test_mirror_clears_the_mapped_fields_of_a_person_who_left_the_segment():
    (connection,) = parse_connections(_document(segment="vip", mode="mirror"), SCHEMAS)
    contacts = connection.mapping("contacts")
    left = Source("person-1", PERSON.profile, frozenset({"at_risk"}))
    assert not in_scope(contacts, left) and in_scope(contacts, PERSON)
    removal = cleared(contacts, left)
    assert removal.key == (("cdp_id", "person-1"),) and set(removal.fields.values()) == {None}
    assert set(removal.fields) == {fm.crm_field for fm in contacts.fields}


def test_hubspot_webhooks_need_the_apps_secret_and_developer_key():
    document = {
        "connections": [
            {
                "id": "hs",
                "kind": "hubspot",
                "credentials": {"token": "HS_TOKEN"},
                "webhooks": {"app_id": "1", "target_url": "http://127.0.0.1:8035/webhooks/hubspot/hs"},
                "mappings": [
                    {
                        "id": "c",
                        "object": "contacts",
                        "match": {"cdp_id": "person.id"},
                        "fields": {"email": "traits.email"},
                    }
                ],
            }
        ]
    }
    problems = _problems(document, {})
    assert set(problems) == {"hs.credentials.client_secret", "hs.credentials.developer_key"}
    document["connections"][0]["credentials"] |= {"client_secret": "HS_SECRET", "developer_key": "HS_DEV_KEY"}
    (connection,) = parse_connections(document)
    assert connection.webhooks.target_url == "http://127.0.0.1:8035/webhooks/hubspot/hs"


def _dated(transform):
    document = _document(
        fields={"email": "traits.email", "firstname": {"source": "traits.signup", "transform": transform}}
    )
    (connection,) = parse_connections(document)
    return connection.mapping("contacts")


@pytest.mark.parametrize("value", [-1e18, 1e300, float("inf"), float("nan"), 1e18, "99999-01-01", "garbage"])
@pytest.mark.parametrize("transform", ["date", "datetime"])
def test_a_time_no_calendar_holds_is_missing_never_an_error_that_stops_the_batch(value, transform):
    # Traits come from any SDK client: `-1e18` made datetime.fromtimestamp raise OSError, which the
    # projection did not expect, so one person's trait raised out of the connector's whole batch.
    projection = project(
        _dated(transform), Source("person-1", {"traits.email": "a@example.com", "traits.signup": value})
    )
    assert isinstance(projection, Projection) and "firstname" not in projection.fields


def test_a_time_with_an_offset_is_written_in_utc():
    # "10:00+02:00" was written as "10:00Z": two hours off, and a day off near midnight.
    source = Source("person-1", {"traits.email": "a@example.com", "traits.signup": "2026-05-01T01:30:00+02:00"})
    assert project(_dated("datetime"), source).fields["firstname"] == "2026-04-30T23:30:00Z"
    assert project(_dated("date"), source).fields["firstname"] == "2026-04-30"
    early = Source("person-1", {"traits.email": "a@example.com", "traits.signup": "0099-01-01T00:00:00Z"})
    assert project(_dated("datetime"), early).fields["firstname"] == "0099-01-01T00:00:00Z"


@pytest.mark.parametrize("value", ["NaN", "nan", "inf", "-Infinity", "1e400", float("nan"), float("inf")])
@pytest.mark.parametrize("transform", ["number", "round:2"])
def test_a_number_that_is_no_number_is_missing_not_a_null_that_clears_the_crm_field(value, transform):
    # float("NaN") went out as null (orjson writes NaN and inf as null), clearing the CRM's value in upsert
    # mode, and NaN never equals itself, so every later profile change of the person wrote it again.
    projection = project(
        _dated(transform), Source("person-1", {"traits.email": "a@example.com", "traits.signup": value})
    )
    assert isinstance(projection, Projection) and "firstname" not in projection.fields


@pytest.mark.parametrize("obj", ["../../x", "contacts/../../crm/v3/objects/contacts", "a?b=c", "Contact describe", ""])
def test_an_object_name_that_is_a_path_is_refused_naming_the_field(obj):
    # Object names go into request paths (/crm/v3/objects/<object>/..., /sobjects/<object>/describe): one
    # holding "/", "..", "?" sent the connector's token to another path of the CRM's API.
    document = _document(object=obj)
    problems = _problems(document, {})
    assert "hubspot/contacts.object" in problems


@pytest.mark.parametrize("obj", ["contacts", "Contact", "CDP_Score__c", "2-3508482", "p_custom_object", "Contacts"])
def test_the_crms_own_object_names_are_accepted(obj):
    (connection,) = parse_connections(_document(object=obj))
    assert connection.mapping("contacts").object == obj


@pytest.mark.parametrize("transform", ["round:\u00b2", "truncate:\u00b9"])
def test_a_transform_argument_that_is_no_ascii_number_is_refused_naming_the_field(transform):
    """`str.isdigit` takes the superscript digits, which `int` then refuses: the value went missing on every
    change instead of the document being refused at start."""
    fields = {"cdp_churn_risk": {"source": "scores.churn_risk", "transform": transform}}
    problems = _problems(_document(fields=fields))
    assert any("cdp_churn_risk" in path for path in problems), problems


def test_a_connection_or_mapping_id_or_a_credential_name_with_a_trailing_newline_is_refused():
    """The id patterns were anchored with `$`, which also matches before a final newline."""
    connection = _document()
    connection["connections"][0]["id"] = "hubspot\n"
    assert "connections[0].id" in _problems(connection)
    mapping = _problems(_document(id="contacts\n"))
    assert "hubspot.mappings[0].id" in mapping, mapping
    credential = _document()
    credential["connections"][0]["credentials"] = {"token": "HUBSPOT_TOKEN\n"}
    assert any("credentials" in path for path in _problems(credential))


def test_inbound_overlap_seconds_is_read_and_a_bad_one_named():
    document = _document()
    (connection,) = parse_connections(document, SCHEMAS)
    assert connection.inbound_overlap is None  # the CRM's default (inbound/core.py INBOUND_OVERLAP)
    document["connections"][0]["inbound"] = {"start": "now", "overlap_seconds": 30}
    (connection,) = parse_connections(document, SCHEMAS)
    assert connection.inbound_overlap == 30.0
    for bad in (-1, 86_401, "180", True):
        document["connections"][0]["inbound"] = {"overlap_seconds": bad}
        assert list(_problems(document)) == ["hubspot.inbound.overlap_seconds"], bad
