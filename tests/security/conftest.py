"""The security tests' bus: a real nats-server with one user per service, as `cdpctl up` configures it
(`cdp_kit.natsauth.authorization_config`, 2 partitions, one replica each), its streams made by the
provisioner as cdpctl's operator. Each test connects as the services it plays, with their own users and
inbox prefixes, and tries what a compromised one could."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest

from cdp_kit.natsauth import (
    MODEL_BUCKET,
    OPERATOR,
    ROLES,
    NatsClientSettings,
    authorization_config,
    inbox_prefix,
    new_password,
    write_credentials,
)
from cdp_kit.natsserver import NatsServer
from cdp_kit.provision import as_operator

PARTITIONS = 2


@dataclass
class SecuredBus:
    url: str
    passwords: dict[str, str]
    operator: str
    secrets: Path

    def settings(self, service: str) -> NatsClientSettings:
        """What `Bus.connect` reads from a service's environment: its credentials file."""
        path = self.secrets / f"{service}.json"
        write_credentials(path, service, self.passwords[service])
        return NatsClientSettings(credentials_file=path)

    def _url(self, user: str, password: str) -> str:
        return self.url.replace("nats://", f"nats://{user}:{password}@", 1)

    async def connect(self, service: str) -> nats.NATS:
        """A connection as `service`'s own user, replies on its own inbox prefix (as `Bus.connect` makes)."""
        return await nats.connect(
            self._url(service, self.passwords[service]), inbox_prefix=inbox_prefix(service).encode()
        )

    async def operator_connection(self) -> nats.NATS:
        return await nats.connect(self._url(OPERATOR, self.operator))


@pytest.fixture
def secured_bus(tmp_path) -> Iterator[SecuredBus]:
    passwords = {name: new_password() for name in ROLES}
    operator = new_password()
    config = authorization_config(passwords, operator_password=operator, partitions=PARTITIONS)
    with NatsServer(store_dir=tmp_path / "nats", config=config) as server:
        # Every stream and bucket a deployment can have: the ownership bucket (CDP_OWNERSHIP=nats) and the
        # model store, each a place a service's user may write bytes of its choosing.
        environ = {
            "CDP_PARTITIONS": str(PARTITIONS),
            "CDP_OWNERSHIP": "nats",
            "CDP_SCORING_MODEL_STORE": f"nats://{MODEL_BUCKET}",
        }
        asyncio.run(as_operator(server.url, operator, environ))
        yield SecuredBus(server.url, passwords, operator, tmp_path)
