"""Through the real collector, identity and profile: a Salesforce user's edit of Ada's contact lands on the
profile Ada already has (linked by her email, not a second profile), as traits whose provenance is the
CRM's collector source and the inbound event, and the case opened about her is on her timeline."""

from __future__ import annotations

import base64
import functools
import json

import grpc

from cdp.profile.v1 import profile_pb2, profile_pb2_grpc
from cdp_crm.adapters.salesforce import SalesforceAdapter
from cdp_crm.budgets import SharedBudget
from cdp_crm.domain.mapping import parse_connections
from cdp_crm.inbound import Collector, Poller
from cdp_crm.inbound.salesforce import SalesforceReader
from cdp_crm_emulators.salesforce import SalesforceEmulator
from cdp_kit.service import serving
from cdp_testing.waiting import eventually

WEB_KEY, CRM_KEY = "wk-web-0001", "wk-crm-0001"


async def test_a_contact_edit_in_salesforce_lands_on_the_persons_profile_with_the_crm_as_provenance(
    nats_server, tmp_path, store, session
):
    from cdp_collector.__main__ import setup as collector_setup
    from cdp_collector.settings import CollectorSettings
    from cdp_identity.__main__ import setup as identity_setup
    from cdp_identity.settings import IdentitySettings
    from cdp_profile.__main__ import setup as profile_setup
    from cdp_profile.settings import ProfileSettings

    sources = tmp_path / "sources.json"
    sources.write_text(json.dumps({"sources": [{"id": "web", "write_key": WEB_KEY},
                                               {"id": "crm-salesforce", "write_key": CRM_KEY}]}))  # fmt: skip
    common = dict(
        nats_url=nats_server.url, grpc_host="127.0.0.1", grpc_port=0, auth_mode="none", partitions=2, shutdown_grace=1.0
    )
    collector = CollectorSettings(**common, sources_file=sources, http_host="127.0.0.1", http_port=0)
    identity = IdentitySettings(**common, store_url=f"sqlite:///{tmp_path / 'identity.db'}", batch_size=100)
    async with (
        SalesforceEmulator() as sf,
        serving(collector, collector_setup) as c,
        serving(identity, identity_setup) as i,
    ):
        profile = ProfileSettings(
            **common, store_url=f"sqlite:///{tmp_path / 'profile.db'}", identity_address=f"127.0.0.1:{i.grpc.port}"
        )
        async with serving(profile, profile_setup) as p, grpc.aio.insecure_channel(f"127.0.0.1:{p.grpc.port}") as ch:
            collector_url = f"http://127.0.0.1:{c.ports['http']}"
            profiles = profile_pb2_grpc.ProfileServiceStub(ch)
            # Ada signed up on the web: her profile exists, known by her user id and email.
            signup = {"userId": "ada-1", "traits": {"email": "ada@example.com", "plan": "pro"}}
            web_auth = {"Authorization": "Basic " + base64.b64encode(f"{WEB_KEY}:".encode()).decode()}
            async with session.post(f"{collector_url}/v1/identify", json=signup, headers=web_auth) as r:
                assert r.status == 200
            ada = await _eventually(lambda: _lookup(profiles, "user_id", "ada-1"))

            document = {"connections": [{
                "id": "sf", "kind": "salesforce", "account": "org-1", "url": sf.base_url,
                "credentials": {"client_id": "SF_ID", "client_secret": "SF_SECRET"},
                "mappings": [{"id": "contacts", "object": "Contact", "match": {"CDP_Id__c": "person.id"},
                              "fields": {"Email": "traits.email", "Title": "traits.title"}}],
            }]}  # fmt: skip
            (connection,) = parse_connections(document)
            adapter = SalesforceAdapter(
                session, client_id="local-consumer-key", client_secret="local-consumer-secret", login_url=sf.base_url
            )
            poller = Poller(
                store, connection, SalesforceReader(connection, adapter, SharedBudget(store, connection)),
                Collector(session, collector_url, CRM_KEY),
            )  # fmt: skip
            # A sales rep finds Ada in Salesforce, gives her a title and opens a case about her.
            contact = sf.user_create("Contact", {"LastName": "Lovelace", "Email": "ada@example.com"})
            sf.clock.advance(1)
            sf.user_update("Contact", contact["Id"], {"Title": "Analyst"})
            sf.user_create("Case", {"Subject": "Cannot log in", "ContactId": contact["Id"]})
            await poller.poll()

            def titled():
                async def read():
                    found = await _lookup(profiles, "email", "ada@example.com")
                    return found if found is not None and "title" in found.traits else None

                return read()

            seen = await _eventually(titled)
            assert seen.person_id == ada.person_id  # her own profile, not a second one
            title = seen.traits["title"]
            assert title.value.string_value == "Analyst"
            assert title.provenance.source == "crm-salesforce"  # the CRM's collector source
            assert title.provenance.event_id.startswith("crm-")  # the inbound event that carried it
            assert seen.traits["plan"].provenance.source == "web"

            async def case_on_timeline():
                page = await profiles.ListEvents(profile_pb2.ListEventsRequest(person_id=ada.person_id, page_size=50))
                return [e for e in page.events if e.name == "CRM Case Opened"]

            (case,) = await _eventually(case_on_timeline)
            assert case.source == "crm-salesforce"


async def _lookup(stub, kind: str, value: str):
    try:
        return await stub.LookupProfile(profile_pb2.LookupProfileRequest(identifier_type=kind, identifier_value=value))
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


_eventually = functools.partial(eventually, timeout=20.0, every=0.1)
