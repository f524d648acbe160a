"""The truststore's watch (coordinator/agent/dirwatch.py): a read of an unchanged directory skips its per-file stats,
and every change a stat would see is in the very next read, including those inotify cannot see. And its listener,
which tells of a change as it is made."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from coordinator import pki
from coordinator.agent import truststore
from coordinator.agent.dirwatch import Listener, Watch
from coordinator.agent.truststore import TruststoreReader, write_truststore_entry
from coordinator.core.model import InvalidEntry, SourceReport

NAMES = ("n1", "n2", "n3")


@pytest.fixture(scope="module")
def identities() -> dict[str, pki.Identity]:
    return {name: pki.make_identity(name) for name in (*NAMES, "n4")}


@pytest.fixture
def directory(tmp_path: Path, identities: dict[str, pki.Identity]) -> Path:
    store = tmp_path / "truststore"
    store.mkdir()
    for index, name in enumerate(NAMES, 1):
        write_truststore_entry(store, name, f"10.0.0.{index}:9000", identities[name].certificate_pem.decode())
    return store


async def settled(reader: TruststoreReader) -> SourceReport:
    """The report once the reader's watch is set up and vouches for it (the first read sets the watch up)."""
    first = await reader.read(include_certificates=False)
    again = await reader.read(include_certificates=False)
    assert again is first
    return again


def addresses(report: SourceReport) -> dict[str, str]:
    return {r.name: r.address for r in report.records}


def test_a_watch_is_unchanged_only_until_an_entry_changes(directory: Path) -> None:
    watch = Watch(str(directory))
    assert not watch.unchanged()  # the first call sets the watch up
    assert watch.unchanged()
    assert watch.unchanged()
    (directory / "n1.yaml").write_bytes((directory / "n1.yaml").read_bytes())  # the same bytes, in place
    assert not watch.unchanged()
    assert watch.unchanged()
    os.utime(directory / "n2.yaml")
    assert not watch.unchanged()
    (directory / "n3.yaml").unlink()
    assert not watch.unchanged()


def test_watches_share_one_inotify_instance(tmp_path: Path) -> None:
    """A process packs many agents, and a user has 128 inotify instances by default."""

    def instances() -> int:
        links = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
            except FileNotFoundError:
                pass  # the listing's own descriptor, closed since
        return links.count("anon_inode:inotify")

    watches = []
    for index in range(200):
        path = tmp_path / f"d{index}"
        path.mkdir()
        watch = Watch(str(path))
        watch.unchanged()
        watches.append((path, watch))
    assert all(watch.unchanged() for _, watch in watches)
    (watches[150][0] / "new.yaml").write_text("x")
    assert [index for index, (_, watch) in enumerate(watches) if not watch.unchanged()] == [150]
    assert instances() == 1


def test_a_lost_event_counts_as_a_change(directory: Path) -> None:
    """More events than the kernel queues (fs.inotify.max_queued_events) overflow the queue: every watch changed,
    the quiet one too, since the overflow names no directory."""
    watch, quiet = Watch(str(directory)), Watch(str(directory.parent))
    watch.unchanged(), quiet.unchanged()
    assert watch.unchanged() and quiet.unchanged()
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    for index in range(limit + 10):
        # Two files in turn: the kernel merges an event into the one before it when they are the same.
        os.utime(directory / f"{NAMES[index % 2]}.yaml")
    assert not quiet.unchanged()
    assert not watch.unchanged()
    assert watch.unchanged() and quiet.unchanged()


async def test_a_same_size_rewrite_with_the_old_mtime_is_in_the_next_read(
    directory: Path, identities: dict[str, pki.Identity]
) -> None:
    reader = TruststoreReader(directory)
    before = await settled(reader)
    entry = directory / "n2.yaml"
    stat = entry.stat()
    entry.write_bytes(entry.read_bytes().replace(b"10.0.0.2:9000", b"10.0.0.9:9000"))
    os.utime(entry, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = await reader.read(include_certificates=False)
    assert addresses(before)["n2"] == "10.0.0.2:9000"
    assert addresses(after)["n2"] == "10.0.0.9:9000"


async def test_a_write_through_a_symbolic_link_is_in_the_next_read(
    directory: Path, tmp_path: Path, identities: dict[str, pki.Identity]
) -> None:
    """inotify tells the truststore nothing of a write to a link's target elsewhere: the reader stats instead."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_truststore_entry(elsewhere, "n4", "10.0.0.4:9000", identities["n4"].certificate_pem.decode())
    (directory / "n4.yaml").symlink_to(elsewhere / "n4.yaml")
    reader = TruststoreReader(directory)
    await reader.read(include_certificates=False)
    await reader.read(include_certificates=False)
    target = elsewhere / "n4.yaml"
    target.write_bytes(target.read_bytes().replace(b"10.0.0.4:9000", b"10.0.0.44:9000"))
    assert addresses(await reader.read(include_certificates=False))["n4"] == "10.0.0.44:9000"


async def test_a_write_through_another_hard_link_is_in_the_next_read(directory: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-name.yaml"
    os.link(directory / "n3.yaml", other)
    reader = TruststoreReader(directory)
    await reader.read(include_certificates=False)
    await reader.read(include_certificates=False)
    with open(other, "r+b") as handle:  # in place: the inode both names share
        data = handle.read().replace(b"10.0.0.3:9000", b"10.0.0.7:9000")
        handle.seek(0)
        handle.write(data)
    assert addresses(await reader.read(include_certificates=False))["n3"] == "10.0.0.7:9000"


async def test_a_replaced_directory_is_in_the_next_read(directory: Path, identities: dict[str, pki.Identity]) -> None:
    reader = TruststoreReader(directory)
    await settled(reader)
    replacement = directory.parent / "replacement"
    replacement.mkdir()
    write_truststore_entry(replacement, "n4", "10.0.0.4:9000", identities["n4"].certificate_pem.decode())
    directory.rename(directory.parent / "old")
    replacement.rename(directory)
    assert addresses(await reader.read(include_certificates=False)) == {"n4": "10.0.0.4:9000"}
    directory.rename(directory.parent / "gone")
    gone = await reader.read(include_certificates=False)
    assert gone.error and not gone.records


async def test_a_leftover_temporary_file_turns_invalid_with_no_event_to_tell(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write in flight is no entry until it is older than a write takes; that moment changes nothing on disk."""
    monkeypatch.setattr(truststore, "IN_FLIGHT", 0.3)
    temporary = directory / ".n3.yaml2066200893"
    temporary.write_text("name: n3\n")
    reader = TruststoreReader(directory)
    assert (await reader.read(include_certificates=False)).invalid_entries == ()
    assert (await reader.read(include_certificates=False)).invalid_entries == ()
    time.sleep(0.4)
    left = await reader.read(include_certificates=False)
    assert left.invalid_entries == (InvalidEntry(temporary.name, "the temporary file of an interrupted write"),)
    assert await reader.read(include_certificates=False) is left  # vouched for from now on


async def test_each_report_form_is_kept_apart(directory: Path) -> None:
    reader = TruststoreReader(directory)
    bare = await settled(reader)
    full = await reader.read(include_certificates=True)
    assert all(r.certificate_pem for r in full.records) and not any(r.certificate_pem for r in bare.records)
    assert await reader.read(include_certificates=False) is bare
    assert await reader.read(include_certificates=True) is full


async def _told(calls: asyncio.Queue[None], within: float = 2.0) -> bool:
    try:
        await asyncio.wait_for(calls.get(), within)
    except TimeoutError:
        return False
    return True


async def test_a_listener_is_called_when_a_watched_directory_changes_and_not_before(
    directory: Path, identities: dict[str, pki.Identity]
) -> None:
    calls: asyncio.Queue[None] = asyncio.Queue()
    listener = Listener([str(directory)], lambda: calls.put_nowait(None))
    assert not await _told(calls, 0.2), "nothing changed yet"
    (directory / "n3.yaml").unlink()
    assert await _told(calls), "told of a removal without anyone reading the directory"
    while not calls.empty():  # one change is several events: the callback runs for each
        calls.get_nowait()
    write_truststore_entry(directory, "n4", "10.0.0.4:9000", identities["n4"].certificate_pem.decode())
    assert await _told(calls), "and of a new record"
    del listener


async def test_a_listener_watches_a_replaced_directory_again_once_rearmed(directory: Path, tmp_path: Path) -> None:
    calls: asyncio.Queue[None] = asyncio.Queue()
    listener = Listener([str(directory)], lambda: calls.put_nowait(None))
    directory.rename(tmp_path / "old")
    directory.mkdir()
    await asyncio.sleep(0.1)
    while not calls.empty():  # the rename itself, seen on the old directory
        calls.get_nowait()
    listener.rearm()
    (directory / "n1.yaml").write_text("new")
    assert await _told(calls), "the new directory at the path is watched"
