"""A session's working directory over REST: what the kernel reads and writes (``open('x')``)."""

from __future__ import annotations

import asyncio

from ._rest import RestClient
from .models import FileInfo


class Files:
    """Upload, download, list and delete files in a sandbox's working directory. Paths are
    relative to it; ``..`` and absolute paths are refused by the server."""

    def __init__(self, rest: RestClient, session_id: str) -> None:
        self._rest = rest
        self._session_id = session_id

    def list(self, path: str = "") -> list[FileInfo]:
        """The entries of directory ``path`` (default: the working directory itself)."""
        return self._rest.list_files(self._session_id, path)

    def read(self, path: str) -> bytes:
        """The contents of file ``path``."""
        return self._rest.read_file(self._session_id, path)

    def write(self, path: str, data: bytes | str) -> FileInfo:
        """Writes ``data`` (text is UTF-8 encoded) to ``path``, creating missing directories."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        return self._rest.write_file(self._session_id, path, raw)

    def remove(self, path: str) -> None:
        """Deletes file or directory ``path`` (a directory with everything in it)."""
        self._rest.delete_file(self._session_id, path)


class AsyncFiles:
    """:class:`Files` for :class:`~kernelbox.AsyncSandbox` (the same calls, awaited)."""

    def __init__(self, rest: RestClient, session_id: str) -> None:
        self._files = Files(rest, session_id)

    async def list(self, path: str = "") -> list[FileInfo]:
        """The entries of directory ``path``."""
        return await asyncio.to_thread(self._files.list, path)

    async def read(self, path: str) -> bytes:
        """The contents of file ``path``."""
        return await asyncio.to_thread(self._files.read, path)

    async def write(self, path: str, data: bytes | str) -> FileInfo:
        """Writes ``data`` to ``path``."""
        return await asyncio.to_thread(self._files.write, path, data)

    async def remove(self, path: str) -> None:
        """Deletes file or directory ``path``."""
        await asyncio.to_thread(self._files.remove, path)
