"""A sandbox's working directory through the SDK: upload, read in a cell, files the cell
writes, download, list, delete; and the server's refusals as exceptions."""

from __future__ import annotations

import asyncio

import pytest
from conftest import Server

from kernelbox import AsyncSandbox, KernelboxError, Sandbox, SandboxFileNotFoundError


def test_a_file_goes_in_is_used_by_a_cell_and_its_output_comes_back(sandbox: Sandbox) -> None:
    info = sandbox.files.write("data/input.csv", "a,b\n1,2\n3,4\n")
    assert info.path == "data/input.csv" and info.size == 12

    ex = sandbox.run_code(
        "import csv, os\n"
        "rows = list(csv.DictReader(open('data/input.csv')))\n"
        "os.makedirs('output', exist_ok=True)\n"
        "open('output/total.txt', 'w').write(str(sum(int(r['b']) for r in rows)))"
    )
    assert ex.error is None
    assert [f.path for f in ex.files] == ["output/total.txt"]
    assert sandbox.files.read("output/total.txt") == b"6"

    names = {f.path: f.is_dir for f in sandbox.files.list()}
    assert names.get("data") is True and names.get("output") is True
    assert [f.path for f in sandbox.files.list("data")] == ["data/input.csv"]

    sandbox.files.remove("data")
    assert "data" not in {f.path for f in sandbox.files.list()}


def test_bad_paths_and_missing_files_are_clear_errors(sandbox: Sandbox) -> None:
    with pytest.raises(KernelboxError, match=r"\.\."):
        sandbox.files.write("../escape.txt", b"x")
    with pytest.raises(SandboxFileNotFoundError):
        sandbox.files.read("no-such-file.txt")
    with pytest.raises(FileNotFoundError):
        sandbox.files.remove("no-such-dir")


def test_the_async_api_has_the_same_files(server: Server) -> None:
    async def scenario() -> bytes:
        async with AsyncSandbox.create(server.url, server.token) as sb:
            await sb.files.write("note.txt", "from async")
            ex = await sb.run_code("open('note.txt').read()")
            assert ex.text == "'from async'"
            return await sb.files.read("note.txt")

    assert asyncio.run(scenario()) == b"from async"
