"""The REST half of the API (``/v1/sessions``), over the standard library's urllib."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .errors import NetworkError, ServerError, error_for_status
from .models import FileInfo, SessionInfo


class RestClient:
    """Creates, looks up and deletes sessions. Blocking; thread-safe."""

    def __init__(self, base_url: str, token: str, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout

    def create_session(self, network: bool, env: dict[str, str] | None) -> SessionInfo:
        """``POST /v1/sessions``."""
        body: dict[str, Any] = {}
        if network:
            body["network"] = True
        if env:
            body["env"] = dict(env)
        return SessionInfo.from_json(self._request("POST", "/v1/sessions", body))

    def get_session(self, session_id: str) -> SessionInfo:
        """``GET /v1/sessions/{id}``."""
        return SessionInfo.from_json(self._request("GET", _session_path(session_id)))

    def list_sessions(self) -> list[SessionInfo]:
        """``GET /v1/sessions``."""
        return [SessionInfo.from_json(s) for s in self._request("GET", "/v1/sessions")]

    def delete_session(self, session_id: str) -> None:
        """``DELETE /v1/sessions/{id}``."""
        self._request("DELETE", _session_path(session_id))

    def list_files(self, session_id: str, path: str) -> list[FileInfo]:
        """``GET /v1/sessions/{id}/files?path=``."""
        query = "?" + urllib.parse.urlencode({"path": path}) if path else ""
        body = self._request("GET", _session_path(session_id) + "/files" + query)
        entries = body.get("entries", []) if isinstance(body, dict) else []
        return [FileInfo.from_json(e) for e in entries if isinstance(e, dict)]

    def read_file(self, session_id: str, path: str) -> bytes:
        """``GET /v1/sessions/{id}/files/{path}``."""
        return self._send("GET", _file_path(session_id, path), None, "application/octet-stream")

    def write_file(self, session_id: str, path: str, data: bytes) -> FileInfo:
        """``PUT /v1/sessions/{id}/files/{path}``."""
        raw = self._send("PUT", _file_path(session_id, path), data, "application/octet-stream")
        body = json.loads(raw) if raw.strip() else {}
        return FileInfo.from_json(body if isinstance(body, dict) else {})

    def delete_file(self, session_id: str, path: str) -> None:
        """``DELETE /v1/sessions/{id}/files/{path}``."""
        self._send("DELETE", _file_path(session_id, path), None, "application/json")

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        raw = self._send(method, path, data, "application/json", json_body=data is not None)
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ServerError(f"{method} {path}: the server's answer is not JSON") from None

    def _send(
        self,
        method: str,
        path: str,
        data: bytes | None,
        accept: str,
        json_body: bool = False,
    ) -> bytes:
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self._token}")
        request.add_header("Accept", accept)
        if data is not None:
            content_type = "application/json" if json_body else "application/octet-stream"
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                raw: bytes = response.read()
        except urllib.error.HTTPError as e:
            raise error_for_status(e.code, _error_message(e)) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise NetworkError(f"cannot reach kernelbox at {self.base_url}: {reason}") from e
        return raw


def _file_path(session_id: str, path: str) -> str:
    return _session_path(session_id) + "/files/" + urllib.parse.quote(path.lstrip("/"), safe="/")


def _session_path(session_id: str) -> str:
    return "/v1/sessions/" + urllib.parse.quote(session_id, safe="")


def _error_message(error: urllib.error.HTTPError) -> str:
    """The server's ``{"error": ...}`` message, or the HTTP reason when the body has none."""
    try:
        body = json.loads(error.read() or b"null")
    except (ValueError, OSError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return f"HTTP {error.code} {error.reason}"
