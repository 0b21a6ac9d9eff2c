"""Where ONNX files live: a folder (a volume in Kubernetes) or a JetStream object store bucket.

Files are content-addressed within a model: `<name>/<version>-<sha256[:16]>.onnx`, written once and never
changed, so a reader can never see half a file or a file that no longer matches its registry entry.
The folder is the default (one replica, or a shared ReadWriteMany volume); the object store is shared by
every replica through NATS, with nothing else to run (`CDP_SCORING_MODEL_STORE=nats://<bucket>`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Protocol

import nats.errors
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError

from cdp_kit.bus.setup import answered
from cdp_kit.errors import InvalidArgument, NotFound, Unavailable
from cdp_kit.ownership.group_kv import missing_bucket

SHIPPED = Path(__file__).resolve().parent / "models"


def object_name(name: str, version: str, sha256: str) -> str:
    return f"{name}/{version}-{sha256[:16]}.onnx"


class ModelStore(Protocol):
    async def put(self, name: str, version: str, data: bytes) -> str: ...
    async def get(self, name: str, version: str, sha256: str) -> bytes: ...


def _write_once(path: Path, data: bytes) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside, then renamed: a crash leaves no partial model under the real name.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FolderModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    async def put(self, name: str, version: str, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        await asyncio.to_thread(_write_once, self.root / object_name(name, version, sha), data)
        return sha

    async def get(self, name: str, version: str, sha256: str) -> bytes:
        path = self.root / object_name(name, version, sha256)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise NotFound(f"model file {path} is missing from the model store", reason="model_file_missing") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise NotFound(f"model file {path} does not match its registry entry (sha256)", reason="model_file_corrupt")
        return data


class ObjectModelStore:
    """A JetStream object store bucket (chunked, replicated like any stream)."""

    def __init__(self, js: JetStreamContext, bucket: str) -> None:
        self.js = js
        self.bucket = bucket
        self._store = None

    async def _obs(self):
        if self._store is None:
            try:
                # A look-up, asked again while a stalled server does not answer in time.
                self._store = await answered(
                    self.js, f"bucket {self.bucket}", lambda: self.js.object_store(self.bucket)
                )
            except (BucketNotFoundError, NotFoundError):
                try:
                    self._store = await self.js.create_object_store(
                        self.bucket, config=api.ObjectStoreConfig(bucket=self.bucket, description="cdp ONNX models")
                    )
                except (nats.errors.TimeoutError, APIError) as exc:  # a service's user may not: provisioned
                    raise Unavailable(missing_bucket(f"OBJ_{self.bucket}", exc)) from None
        return self._store

    async def put(self, name: str, version: str, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        await (await self._obs()).put(object_name(name, version, sha), data)
        return sha

    async def get(self, name: str, version: str, sha256: str) -> bytes:
        key = object_name(name, version, sha256)
        try:
            result = await (await self._obs()).get(key)
        except NotFoundError:
            raise NotFound(f"model {key} is missing from bucket {self.bucket}", reason="model_file_missing") from None
        data = result.data or b""
        if hashlib.sha256(data).hexdigest() != sha256:
            raise NotFound(f"model {key} in bucket {self.bucket} does not match its registry entry", reason="corrupt")
        return data


def parse_model_store(url: str) -> tuple[str, str]:
    """("folder", path) or ("nats", bucket) from CDP_SCORING_MODEL_STORE."""
    if url.startswith("nats://"):
        bucket = url.removeprefix("nats://").strip("/")
        if not bucket or not bucket.replace("-", "").replace("_", "").isalnum():
            raise InvalidArgument("CDP_SCORING_MODEL_STORE", f"{url!r}: name a bucket, e.g. nats://cdp-models")
        return "nats", bucket
    if url.startswith("file://"):
        url = url.removeprefix("file://")
    if not url:
        raise InvalidArgument("CDP_SCORING_MODEL_STORE", "is empty: give a folder or nats://<bucket>")
    return "folder", url


def shipped_models() -> list[Path]:
    """The models the project's training pipeline produced (`make models`), shipped in the package."""
    return sorted(SHIPPED.glob("*.onnx"))
