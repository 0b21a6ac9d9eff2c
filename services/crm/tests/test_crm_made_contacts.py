"""A contact a CRM user makes comes in as news, identity makes a person of it, and the person's profile
change comes back to the connector: it is written to that contact, never to a second one (found by the
CRM-admin trial: every contact made in HubSpot or Salesforce with a new email was created again, by
`cdp_id`, within seconds). The person's CRM id is one of their identifiers, as the profile service
answers BatchGetProfiles (here: a stand-in for that answer)."""

from __future__ import annotations

from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_crm_emulators.salesforce import SalesforceEmulator

from .conftest import TOKEN, salesforce_contacts

SF = {"SF_ID": "local-consumer-key", "SF_SECRET": "local-consumer-secret"}


def _profile_service(identifiers: dict[str, list[str]]):
    async def answer(person_ids):
        return {p: identifiers[p] for p in person_ids if p in identifiers}

    return answer


async def test_a_contact_made_in_hubspot_is_the_one_its_person_is_written_to(world_factory):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        body = {"properties": {"email": "ada@example.com", "firstname": "Ada"}}
        url = f"{emulator.base_url}/crm/v3/objects/contacts"
        async with world.session.post(url, json=body, headers=headers) as answer:
            contact_id = (await answer.json())["id"]
        person = {"person-ada": ["email:ada@example.com", f"anonymous_id:hubspot:62515:{contact_id}"]}
        await world.start(identifiers=_profile_service(person))

        await world.profiles({"person-ada": {"traits.email": "ada@example.com", "traits.first_name": "Ada"}})
        await world.eventually(lambda: emulator.find("contacts", "cdp_id", "person-ada"))
        await world.profiles({"person-ada": {"scores.churn_risk": 0.4}})

        def churn_written():
            record = emulator.find("contacts", "cdp_id", "person-ada")
            return record["properties"].get("cdp_churn_risk") == "0.4"

        await world.eventually(churn_written)
        (contact,) = emulator.records("contacts")
        assert contact["id"] == contact_id
        assert contact["properties"]["email"] == "ada@example.com"


async def test_a_contact_held_by_another_person_is_not_taken(world_factory):
    async with HubSpotEmulator() as emulator:
        world = await world_factory(emulator)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        body = {"properties": {"email": "bo@example.com", "cdp_id": "person-bo"}}
        url = f"{emulator.base_url}/crm/v3/objects/contacts"
        async with world.session.post(url, json=body, headers=headers) as answer:
            contact_id = (await answer.json())["id"]
        person = {"person-other": [f"anonymous_id:hubspot:62515:{contact_id}"]}
        await world.start(identifiers=_profile_service(person))
        await world.profiles({"person-other": {"traits.email": "other@example.com"}})
        await world.eventually(lambda: emulator.find("contacts", "cdp_id", "person-other"))
        assert emulator.find("contacts", "cdp_id", "person-bo")["id"] == contact_id
        assert len(emulator.records("contacts")) == 2


async def test_a_contact_made_in_salesforce_is_the_one_its_person_is_written_to(world_factory):
    async with HubSpotEmulator() as hubspot, SalesforceEmulator() as emulator:
        world = await world_factory(hubspot)
        async with world.session.post(
            f"{emulator.base_url}/services/oauth2/token",
            data={"grant_type": "client_credentials", "client_id": SF["SF_ID"], "client_secret": SF["SF_SECRET"]},
        ) as answer:
            token = (await answer.json())["access_token"]
        url = f"{emulator.base_url}/services/data/v60.0/sobjects/Contact"
        body = {"LastName": "Lovelace", "Email": "ada@example.com"}
        async with world.session.post(url, json=body, headers={"Authorization": f"Bearer {token}"}) as answer:
            contact_id = (await answer.json())["id"]
        person = {"person-ada": [f"anonymous_id:salesforce:sf:{contact_id}"]}
        fields = {"LastName": "traits.last_name", "FirstName": "traits.first_name", "Email": "traits.email"}
        await world.start(salesforce_contacts(emulator, fields), env=SF, identifiers=_profile_service(person))

        profile = {"traits.email": "ada@example.com", "traits.first_name": "Ada", "traits.last_name": "Lovelace"}
        await world.profiles({"person-ada": profile})
        # The key is stamped first, then the upsert writes the fields: wait for the upsert, not the stamp.
        await world.eventually(lambda: (emulator.find("Contact", "CDP_Id__c", "person-ada") or {}).get("FirstName"))
        (contact,) = emulator.records("Contact")
        assert contact["Id"] == contact_id and contact["FirstName"] == "Ada"
