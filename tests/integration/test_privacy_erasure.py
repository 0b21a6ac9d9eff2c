"""A privacy deletion leaves no bytes of the person in the services' SQLite files: not in a live row,
not in the write-ahead log's old page images, not in freed pages (collector → identity → profile)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc

from cdp.identity.v1 import identity_pb2
from cdp.profile.v1 import profile_pb2

from .conftest import running_chain

USER = "u-erase-8c21d4"
EMAIL = "erase.me.9f3e@example.org"
PHONE = "+44 7700 900456"


def sqlite_files_holding(directory: Path, markers: list[bytes]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and ".db" in path.name:
            data = path.read_bytes()
            held = [m.decode() for m in markers if m in data]
            if held:
                found[path.name] = held
    return found


async def test_after_a_privacy_deletion_no_sqlite_file_holds_the_person(nats_server, tmp_path):
    markers = [EMAIL.encode(), USER.encode(), b"7700 900456", b"7700900456"]
    async with running_chain(nats_server.url, tmp_path) as chain:
        await chain.post(
            {
                "type": "identify",
                "messageId": "erase-1",
                "userId": USER,
                "traits": {"email": EMAIL, "phone": PHONE},
            },
            {"type": "track", "event": "Viewed", "messageId": "erase-2", "userId": USER},
        )
        found = await chain.profiles_when([USER], lambda p: p.event_count >= 2, timeout=15.0)
        assert found, "the events never reached the profile"
        held = sqlite_files_holding(tmp_path, markers)
        assert any(name.startswith("identity") for name in held) and any(name.startswith("profile") for name in held)

        await chain.profile.Delete(
            profile_pb2.DeleteRequest(
                person_id=found[USER].person_id, mode=profile_pb2.DELETE_MODE_DELETE, request_id="erase-delete"
            )
        )

        async def purged() -> bool:
            try:
                await chain.identity.Lookup(
                    identity_pb2.LookupRequest(identifier=identity_pb2.Identifier(type="user_id", value=USER))
                )
            except grpc.aio.AioRpcError as exc:
                return exc.code() == grpc.StatusCode.NOT_FOUND
            return False

        deadline = time.monotonic() + 15.0
        while not await purged():
            assert time.monotonic() < deadline, "identity never purged the deleted person"
            await asyncio.sleep(0.1)
        # The lookup answers from memory: the purge's write and the erase follow within moments.
        for _ in range(50):
            if not sqlite_files_holding(tmp_path, markers):
                break
            await asyncio.sleep(0.1)
        assert sqlite_files_holding(tmp_path, markers) == {}
