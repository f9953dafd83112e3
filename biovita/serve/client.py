"""A small client for a biovita service (standard library only): what a script or a test
sends, as a browser's FormData would."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path


def post(url: str, fields: dict[str, str] | None = None, file: tuple[str, bytes] | None = None,
         timeout: float = 120) -> tuple[int, dict]:
    """A multipart POST: (HTTP status, the JSON answer), errors included.

        post("http://127.0.0.1:8000/identify", {"rank": "genus"}, ("call.mp3", data))"""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for k, v in (fields or {}).items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    if file:
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file[0]}"\r\n'
                   f"Content-Type: application/octet-stream\r\n\r\n".encode() + file[1] + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    req = urllib.request.Request(url, data=body.getvalue(), method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, _error(e)


def _error(e: urllib.error.HTTPError) -> dict:
    """An error answer as a dict: the service's JSON, or (an overloaded service answers 503
    in plain text) `{"error": "overloaded", "message": ..., "retry_after": seconds}`."""
    body = e.read()
    try:
        out = json.loads(body)
    except ValueError:
        out = {"error": "overloaded" if e.code == 503 else f"http_{e.code}",
               "message": body.decode("utf-8", "replace")[:300]}
    if e.headers.get("Retry-After"):
        out["retry_after"] = float(e.headers["Retry-After"])
    return out


def identify(url: str, path: str | Path, rank: str = "species", k: int = 5) -> dict:
    """POST a recording or photo to a service's /identify; raises on an error answer."""
    status, res = post(url.rstrip("/") + "/identify", {"rank": rank, "k": str(k)},
                       (Path(path).name, Path(path).read_bytes()))
    if status != 200:
        again = f" (retry after {res['retry_after']:g} s)" if "retry_after" in res else ""
        raise RuntimeError(f"{status} {res.get('error')}: {res.get('message')}{again}")
    return res
