"""A journal cannot vanish quietly: on a real lab whose agents have admitted steps, a coordinator killed and its journal
damaged (zero bytes, deleted with its -wal and -shm, a garbage WAL tail, flipped bytes, half a file) refuses to
start, naming the file, what it found and the recovery command, and changes none of the damaged files; the recovery
the operator then asks for (`memberguard journal recover`) moves them aside whole and yields a coordinator whose
steps every agent accepts, its epoch above theirs, with the recovery journaled."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from memberguard import Client

from coordinator import cli
from coordinator.agent.steps import EPOCH_FILE
from coordinator.journal import Journal, JournalDamaged, diagnose, marker_path
from coordinator.lab import lab as labs
from tests.test_journal import operation

WAL_FRAME = 24 + 4096  # a WAL frame: its header and one page (SQLite's default page size)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[labs.Lab]:
    """A 3-node lab that has run one join (n4), so that every agent has admitted a step of epoch 1."""
    running = labs.up(tmp_path / "lab", 3)
    try:
        labs.add_node(running.dir)
        yield labs.Lab.load(running.dir)
    finally:
        labs.down(running.dir)


def _journal(lab: labs.Lab) -> Path:
    return lab.dir / "coordinator" / "journal.db"


def _epochs(lab: labs.Lab) -> dict[str, int]:
    lab = labs.Lab.load(lab.dir)
    return {n["name"]: int((Path(n["state_dir"]) / EPOCH_FILE).read_text()) for n in lab.document["nodes"]}


def _kill_coordinator(lab: labs.Lab) -> None:
    """kill -9 the coordinator, and returns once it is gone: its journal is as a crash leaves it (WAL included)."""
    pid = labs.Lab.load(lab.dir).document["coordinator"]["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while labs._is_ours(pid):
        assert time.monotonic() < deadline, "the coordinator survived SIGKILL"
        time.sleep(0.01)
    child = labs._children.pop(pid, None)
    if child is not None:
        child.wait()


def _stop_coordinator(lab: labs.Lab) -> None:
    """Stops the coordinator cleanly: it closes its journal, which checkpoints the WAL into the main file."""
    labs._stop([labs.Lab.load(lab.dir).document["coordinator"]["pid"]])
    assert not os.path.exists(f"{_journal(lab)}-wal"), "a clean stop leaves the journal in its main file"


def _files(directory: Path) -> dict[str, str]:
    """The journal's files in directory by name, with a digest of each. The shared memory (-shm) only by name: it is
    an index of the WAL that any reader rebuilds, and holds nothing of its own."""
    return {
        path.name: "index" if path.name.endswith("-shm") else hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.glob("journal.db*"))
        if path.is_file() and not path.name.endswith(".lock")
    }


# --- the damage: each leaves the coordinator stopped and its journal damaged -------------------------------------


def _zero_bytes(lab: labs.Lab) -> None:
    _kill_coordinator(lab)
    _journal(lab).write_bytes(b"")


def _zero_bytes_after_a_clean_stop(lab: labs.Lab) -> None:
    _stop_coordinator(lab)
    _journal(lab).write_bytes(b"")


def _deleted_with_wal_and_shm(lab: labs.Lab) -> None:
    _kill_coordinator(lab)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{_journal(lab)}{suffix}").unlink()


def _deleted_with_its_marker(lab: labs.Lab) -> None:
    """Nothing beside the coordinator remembers the journal: the agents' epochs are the evidence."""
    _deleted_with_wal_and_shm(lab)
    os.unlink(marker_path(_journal(lab)))


def _garbage_wal_tail(lab: labs.Lab) -> None:
    """The WAL's last frame, the epoch bump of the coordinator's latest start, overwritten: SQLite stops reading the
    WAL at the first frame whose checksum fails, and the journal reads as if that start never bumped the epoch."""
    _kill_coordinator(lab)
    labs.restart(lab.dir, "coordinator")  # its start's epoch bump is the last transaction in the WAL
    _kill_coordinator(lab)
    wal = Path(f"{_journal(lab)}-wal")
    size = wal.stat().st_size
    assert size > WAL_FRAME, "the journal's recent transactions are in its WAL"
    with wal.open("r+b") as log:
        log.seek(size - WAL_FRAME)
        log.write(os.urandom(WAL_FRAME))


def _flipped_bytes(lab: labs.Lab) -> None:
    """The b-tree header of the journal's second page inverted, in its main file."""
    _stop_coordinator(lab)
    with _journal(lab).open("r+b") as journal:
        journal.seek(4096)
        header = journal.read(8)
        journal.seek(4096)
        journal.write(bytes(byte ^ 0xFF for byte in header))


def _half_a_file(lab: labs.Lab) -> None:
    _stop_coordinator(lab)
    os.truncate(_journal(lab), _journal(lab).stat().st_size // 2)


DAMAGE: dict[str, tuple[Callable[[labs.Lab], None], str]] = {
    # damage: (how, what the refusal says it found)
    "zero-bytes": (_zero_bytes, "is empty (0 bytes), yet its write-ahead log"),
    "zero-bytes-after-a-clean-stop": (_zero_bytes_after_a_clean_stop, "is empty (0 bytes), yet its marker"),
    "deleted-with-wal-and-shm": (_deleted_with_wal_and_shm, "is missing, yet its marker"),
    "deleted-with-its-marker": (_deleted_with_its_marker, "is missing, yet agents have admitted steps of a journal"),
    "garbage-wal-tail": (_garbage_wal_tail, "transactions it committed are lost"),
    "flipped-bytes": (_flipped_bytes, "SQLite"),
    "half-a-file": (_half_a_file, "is cut short"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_journal_is_refused_then_recovered_on_request(
    lab: labs.Lab, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _epochs(lab)
    assert set(before.values()) == {1}, "every agent admitted the first join's epoch"
    how, found = DAMAGE[damage]
    how(lab)
    damaged = _files(_journal(lab).parent)
    config = lab.dir / "coordinator" / "coordinator.json"

    # Refused: never a silent restart. The message names the file, what was found and the command.
    with pytest.raises(labs.LabError) as refused:
        labs.restart(lab.dir, "coordinator")
    message = str(refused.value)
    assert f"journal {_journal(lab)} " in message and found in message, message
    assert f"memberguard journal recover --config {config}" in message, message
    assert not labs._is_ours(labs.Lab.load(lab.dir).document["coordinator"]["pid"]), "it did not start"
    assert _files(_journal(lab).parent) == damaged, "the refusal changed none of the damaged files"

    # The recovery the operator asks for.
    assert cli.main(["journal", "recover", "--lab", str(lab.dir)]) == cli.EXIT_OK
    printed = capsys.readouterr().out
    assert found in printed, printed
    asides = [p for p in _journal(lab).parent.iterdir() if p.name.startswith("journal.db.damaged-")]
    if damaged:
        assert "moved aside (nothing deleted)" in printed, printed
        [aside] = asides
        assert _files(aside) == damaged, "every damaged file is kept, byte for byte"
    else:
        assert "nothing to move aside" in printed and asides == [], printed

    # A working coordinator: its epoch is above every agent's, so their steps are accepted (a whole join).
    labs.restart(lab.dir, "coordinator")
    entry = labs.add_node(lab.dir)
    after = _epochs(lab)
    assert min(after.values()) > max(before.values()), after
    with Client(labs.Lab.load(lab.dir).endpoint) as client:
        diff = client.check_membership(timeout=10).diff
    assert sorted(m.name for m in diff.members) == ["n1", "n2", "n3", "n4", entry["name"]]
    assert list(diff.discrepancies) == []

    # The recovery is journaled: who, when, from what.
    journal = sqlite3.connect(f"file:{_journal(lab)}?mode=ro", uri=True)
    try:
        [(requested_by, damage_text, moved_to, agents, epoch)] = journal.execute(
            "SELECT requested_by, damage, moved_to, agents, epoch FROM recoveries"
        ).fetchall()
    finally:
        journal.close()
    assert "@" in requested_by and found in damage_text and moved_to == (str(asides[0]) if damaged else "")
    assert {name: seen for name, seen, _ in json.loads(agents)} == before
    # From every epoch known: the agents', and the marker's, which in the garbage-WAL case names the start whose bump
    # the journal lost (one above the agents').
    assert epoch == max(before.values()) + (1 if damage == "garbage-wal-tail" else 0)


def test_an_agent_down_has_its_epoch_read_and_without_a_lab_it_is_unknown(
    lab: labs.Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    _deleted_with_wal_and_shm(lab)
    labs._stop([lab.node("n3")["pid"]])
    config = str(lab.dir / "coordinator" / "coordinator.json")
    assert cli.main(["journal", "recover", "--config", config]) == cli.EXIT_NOT_SUCCEEDED
    refused = capsys.readouterr().err
    assert "the newest epoch of n3" in refused and "--ignore-unreachable" in refused, refused
    assert not _journal(lab).exists() and os.path.exists(marker_path(_journal(lab))), "nothing was changed"

    assert cli.main(["journal", "recover", "--lab", str(lab.dir)]) == cli.EXIT_OK
    printed = capsys.readouterr().out
    n3 = Path(lab.node("n3")["state_dir"]) / EPOCH_FILE
    assert f"agent n3: epoch 1 (read from {n3})" in printed, printed
    assert "agent n1: epoch 1 (its agent at" in printed, printed


def test_recovery_refuses_a_healthy_journal_and_a_running_coordinator(
    lab: labs.Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["journal", "recover", "--lab", str(lab.dir)]) == cli.EXIT_COORDINATOR
    assert "stop the coordinator first" in capsys.readouterr().err
    _stop_coordinator(lab)
    untouched = _files(_journal(lab).parent)
    assert cli.main(["journal", "recover", "--lab", str(lab.dir)]) == cli.EXIT_NOT_SUCCEEDED
    assert "passes every check: there is nothing to recover" in capsys.readouterr().err
    assert _files(_journal(lab).parent) == untouched


def test_each_agent_reports_the_epoch_it_admitted(lab: labs.Lab, capsys: pytest.CaptureFixture[str]) -> None:
    """What recover asks (GetNodeViewResponse.epoch) is what each agent keeps, for the nodes it knows of."""
    _deleted_with_wal_and_shm(lab)
    assert cli.main(["journal", "recover", "--lab", str(lab.dir)]) == cli.EXIT_OK
    printed = capsys.readouterr().out
    for name, epoch in _epochs(lab).items():
        assert f"agent {name}: epoch {epoch} (its agent at {lab.node(name)['agent_address']} answered)" in printed


# --- the journal's own checks, without a lab --------------------------------------------------------------------


def test_a_journal_behind_an_agent_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    with Journal.open(path) as journal:
        journal.create(operation(1))
    with pytest.raises(JournalDamaged) as refused:
        Journal.open(path, seen_epochs={"n1": 1, "n2": 3})
    assert "holds epoch 1, but agents have admitted steps of later epochs (n2 epoch 3)" in refused.value.found
    with Journal.open(path, seen_epochs={"n1": 1, "n2": 1}) as journal:
        assert journal.epoch == 2 and journal.get("op-1") is not None


def test_a_fresh_journal_needs_no_evidence_and_writes_its_marker_before_it_serves(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    assert diagnose(path).damage == "", "no journal and no evidence of one: a new journal may start"
    assert "agents have admitted steps" in diagnose(path, {"n1": 2}).damage
    with Journal.open(path) as journal:
        marker = json.loads(Path(marker_path(path)).read_text())
        assert marker["epoch"] == journal.epoch == 1 and len(marker["journal_id"]) == 32
    with Journal.open(path) as journal:
        assert json.loads(Path(marker_path(path)).read_text()) == {**marker, "epoch": 2}


def test_another_journal_in_its_place_is_refused(tmp_path: Path) -> None:
    first, second = tmp_path / "first" / "journal.db", tmp_path / "second" / "journal.db"
    for path in (first, second):
        path.parent.mkdir()
        Journal.open(path).close()
    os.replace(second, first)
    with pytest.raises(JournalDamaged) as refused:
        Journal.open(first)
    assert "another journal was put in its place" in refused.value.found
