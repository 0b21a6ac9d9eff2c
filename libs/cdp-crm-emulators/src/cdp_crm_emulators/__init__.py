"""Local CRM emulators (Salesforce, HubSpot, Dynamics 365, Zoho) for tests and `make up`.

Each is an aiohttp application with in-memory state that speaks its CRM's documented wire protocol -
paths, JSON shapes, auth flows, per-record errors, pagination, rate-limit headers and 429s - with a fault
injector and an inspection API (see `_server.Emulator`). Test and dev only: never in a production image.
"""

from cdp_crm_emulators._server import Clock, Emulator, FaultInjector
from cdp_crm_emulators.dynamics import DynamicsEmulator
from cdp_crm_emulators.hubspot import HubSpotEmulator
from cdp_crm_emulators.salesforce import SalesforceEmulator
from cdp_crm_emulators.zoho import ZohoEmulator

EMULATORS: dict[str, type[Emulator]] = {
    "dynamics": DynamicsEmulator,
    "hubspot": HubSpotEmulator,
    "salesforce": SalesforceEmulator,
    "zoho": ZohoEmulator,
}

__all__ = [
    "EMULATORS",
    "Clock",
    "DynamicsEmulator",
    "Emulator",
    "FaultInjector",
    "HubSpotEmulator",
    "SalesforceEmulator",
]
