"""Opening each connection: its credentials read from the environment variables the document names, and
the adapter of its kind. A variable that is missing keeps that connection from starting, naming the
connection and the variable (never its value); the other connections start (`open_available`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import aiohttp

from cdp_crm.adapters import Adapter
from cdp_crm.adapters.dynamics import DynamicsAdapter
from cdp_crm.adapters.hubspot import HubSpotAdapter
from cdp_crm.adapters.salesforce import SalesforceAdapter
from cdp_crm.adapters.zoho import ZohoAdapter
from cdp_crm.domain.mapping import Connection, MappingInvalid, Problem


def unset(connection: Connection, environ: Mapping[str, str]) -> list[Problem]:
    """A problem per credential whose environment variable is not set (or empty), naming the variable."""
    return [
        Problem(connection.id, f"credentials.{name}", f"the variable {variable} is not set")
        for name, variable in connection.credentials.items()
        if not environ.get(variable)
    ]


def credentials(connection: Connection, environ: Mapping[str, str]) -> dict[str, str]:
    problems = unset(connection, environ)
    if problems:
        raise MappingInvalid(problems)
    return {name: environ[variable] for name, variable in connection.credentials.items()}


def open_adapter(
    connection: Connection, session: aiohttp.ClientSession, environ: Mapping[str, str], *, timeout: float = 30.0
) -> Adapter:
    given = credentials(connection, environ)
    url = connection.url
    if connection.kind == "hubspot":
        return HubSpotAdapter(session, token=given["token"], timeout=timeout, **({"base_url": url} if url else {}))
    if connection.kind == "salesforce":
        return SalesforceAdapter(session, timeout=timeout, **given, **({"login_url": url} if url else {}))
    if connection.kind == "dynamics":
        assert url is not None  # the document requires it
        authority = {"authority": connection.auth_url} if connection.auth_url else {}
        return DynamicsAdapter(session, url=url, timeout=timeout, **given, **authority)
    return ZohoAdapter(session, timeout=timeout, **given, **({"accounts_url": url} if url else {}))


def open_adapters(
    connections: Iterable[Connection],
    session: aiohttp.ClientSession,
    environ: Mapping[str, str],
    *,
    timeout: float = 30.0,
) -> dict[str, Adapter]:
    adapters, problems = {}, []
    for connection in connections:
        try:
            adapters[connection.id] = open_adapter(connection, session, environ, timeout=timeout)
        except MappingInvalid as exc:
            problems.extend(exc.problems)
    if problems:
        raise MappingInvalid(problems)
    return adapters


def open_available(
    connections: Iterable[Connection],
    session: aiohttp.ClientSession,
    environ: Mapping[str, str],
    *,
    timeout: float = 30.0,
) -> tuple[dict[str, Adapter], dict[str, tuple[str, ...]]]:
    """The adapters of the connections whose credentials are all set, and for each other connection the
    names of its unset variables: one connection missing a secret does not stop the others."""
    adapters: dict[str, Adapter] = {}
    missing: dict[str, tuple[str, ...]] = {}
    for connection in connections:
        if unset(connection, environ):
            missing[connection.id] = tuple(
                variable for variable in connection.credentials.values() if not environ.get(variable)
            )
            continue
        adapters[connection.id] = open_adapter(connection, session, environ, timeout=timeout)
    return adapters, missing
