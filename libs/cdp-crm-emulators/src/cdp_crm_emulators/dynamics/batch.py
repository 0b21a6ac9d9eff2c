"""``multipart/mixed`` as the Web API's ``$batch`` uses it: parsing request parts and writing response parts."""

from __future__ import annotations

import re
from typing import Any

import orjson


def boundary_of(content_type: str) -> str | None:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    return m.group(1) if m and "multipart/mixed" in content_type.lower() else None


def split_multipart(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    parts = []
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk.lstrip(b"\r\n")
        head, _, content = chunk.replace(b"\r\n", b"\n").partition(b"\n\n")
        headers = {}
        for line in head.decode().split("\n"):
            name, _, value = line.partition(":")
            if name.strip():
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, content.rstrip(b"\n")))
    return parts


def http_part(status: int, headers: dict[str, str], answer: Any, content_id: str | None) -> bytes:
    reason = {
        200: "OK",
        201: "Created",
        204: "No Content",
        400: "Bad Request",
        404: "Not Found",
        412: "Precondition Failed",
        429: "Too Many Requests",
    }.get(status, "")
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id:
        lines.append(f"Content-ID: {content_id}")
    lines += ["", f"HTTP/1.1 {status} {reason}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    body = b""
    if answer is not None:
        lines.append("Content-Type: application/json; odata.metadata=minimal")
        body = orjson.dumps(answer)
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body + b"\r\n"
