"""The `local` backend's readers and writers, on real files and a real SQLite database."""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from coordinator import pki
from coordinator.agent.filecache import FileCache, MalformedFile, load_yaml
from coordinator.agent.members_table import (
    MembersTableReader,
    create_members_table,
    delete_member,
    upsert_member,
)
from coordinator.agent.node_state import lay_out_node
from coordinator.agent.raft_files import (
    NodeInfoReader,
    RaftConfigFileReader,
    write_node_info,
    write_raft_config,
)
from coordinator.agent.sources import SourceReader, local_backend
from coordinator.agent.truststore import (
    IN_FLIGHT,
    TruststoreReader,
    remove_truststore_entry,
    write_truststore_entry,
)
from coordinator.core.model import InvalidEntry, MemberRecord, Role, Source, SourceReport
from coordinator.files import write_atomically

NAMES = ("n1", "n2", "n3")
ADDRESSES = {"n1": "10.0.0.1:9000", "n2": "10.0.0.2:9000", "n3": "10.0.0.3:9000"}
NODE_IDS = {"n1": 3297041220608546238, "n2": 22, "n3": 33}
ROLES = {"n1": Role.VOTER, "n2": Role.VOTER, "n3": Role.SPARE}


@pytest.fixture(scope="module")
def identities() -> dict[str, pki.Identity]:
    return {name: pki.make_identity(name) for name in (*NAMES, "n4")}


def pem(identities: dict[str, pki.Identity], name: str) -> str:
    return identities[name].certificate_pem.decode()


class Cluster:
    """A consistent 3-node local cluster laid out under one directory."""

    def __init__(self, root: Path, identities: dict[str, pki.Identity]) -> None:
        self.root = root
        self.identities = identities
        self.members_table = root / "members.db"
        self.raft_config = root / "raft.yaml"
        members = [(n, ADDRESSES[n], pem(identities, n), NODE_IDS[n], ROLES[n]) for n in NAMES]
        for name in NAMES:
            lay_out_node(self.state(name), identities[name], name, ADDRESSES[name], NODE_IDS[name], members)
        create_members_table(self.members_table)
        role_text = {Role.VOTER: "voter", Role.SPARE: "spare"}
        for name in NAMES:
            upsert_member(self.members_table, name, ADDRESSES[name], pem(identities, name), role_text[ROLES[name]])
        write_raft_config(self.raft_config, [(NODE_IDS[n], ADDRESSES[n], ROLES[n]) for n in NAMES])

    def state(self, name: str) -> Path:
        return self.root / name

    def truststore(self, name: str) -> Path:
        return self.state(name) / "truststore"

    def fingerprint(self, name: str) -> str:
        return self.identities[name].fingerprint

    def readers(self, name: str) -> dict[Source, SourceReader]:
        return {r.source: r for r in local_backend(self.state(name), self.members_table, self.raft_config)}


@pytest.fixture
def cluster(tmp_path: Path, identities: dict[str, pki.Identity]) -> Cluster:
    return Cluster(tmp_path, identities)


async def read(reader: SourceReader, *, include_certificates: bool = False) -> SourceReport:
    report = await reader.read(include_certificates=include_certificates)
    assert report.source is reader.source
    return report


# --- a consistent layout --------------------------------------------------------------------------------


async def test_local_backend_has_one_reader_per_local_source(cluster: Cluster) -> None:
    readers = local_backend(cluster.state("n1"), cluster.members_table, cluster.raft_config)
    assert [r.source for r in readers] == [
        Source.MEMBERS_TABLE,
        Source.TRUSTSTORE,
        Source.RAFT_CONFIG,
        Source.RAFT_CACHE,
        Source.NODE_INFO,
    ]


async def test_consistent_layout_reads_back_on_every_source(cluster: Cluster) -> None:
    for node in NAMES:
        readers = cluster.readers(node)
        reports = {source: await read(reader) for source, reader in readers.items()}
        for report in reports.values():
            assert report.error == ""
            assert report.invalid_entries == ()
            assert report.changed_at is not None and report.changed_at <= time.time()

        assert reports[Source.MEMBERS_TABLE].records == tuple(
            MemberRecord(
                name=n,
                address=ADDRESSES[n],
                certificate_fingerprint=cluster.fingerprint(n),
                role=ROLES[n],
                role_text="spare" if n == "n3" else "voter",
                entry=f"row {i}",
            )
            for i, n in enumerate(NAMES, start=1)
        )
        assert reports[Source.TRUSTSTORE].records == tuple(
            MemberRecord(
                name=n,
                address=ADDRESSES[n],
                certificate_fingerprint=cluster.fingerprint(n),
                entry=f"{n}.yaml",
            )
            for n in NAMES
        )
        raft = tuple(
            MemberRecord(address=ADDRESSES[n], node_id=NODE_IDS[n], role=ROLES[n], entry=f"entry {i}")
            for i, n in enumerate(NAMES, start=1)
        )
        assert reports[Source.RAFT_CONFIG].records == raft
        assert reports[Source.RAFT_CONFIG].leader_address == ADDRESSES["n1"]
        assert reports[Source.RAFT_CACHE].records == raft
        assert reports[Source.RAFT_CACHE].leader_address == ""
        assert reports[Source.NODE_INFO].records == (
            MemberRecord(address=ADDRESSES[node], node_id=NODE_IDS[node], role=ROLES[node], entry="info.yaml"),
        )


async def test_node_identity_is_written(cluster: Cluster) -> None:
    assert (cluster.state("n2") / "server.crt").read_bytes() == cluster.identities["n2"].certificate_pem
    assert (cluster.state("n2") / "server.key").stat().st_mode & 0o777 == 0o600


def test_lay_out_node_refuses_a_node_missing_from_its_members(
    tmp_path: Path, identities: dict[str, pki.Identity]
) -> None:
    with pytest.raises(ValueError, match="n4"):
        lay_out_node(tmp_path, identities["n4"], "n4", "10.0.0.4:9000", 44, [])


async def test_certificates_travel_only_when_asked(cluster: Cluster) -> None:
    readers = cluster.readers("n1")
    for source in (Source.MEMBERS_TABLE, Source.TRUSTSTORE):
        without = await read(readers[source])
        with_pems = await read(readers[source], include_certificates=True)
        assert [r.certificate_pem for r in without.records] == ["", "", ""]
        assert [r.certificate_pem for r in with_pems.records] == [pem(cluster.identities, n) for n in NAMES]
        assert with_pems.records == without.records  # the PEM is not part of a record's identity


async def test_no_leader_without_a_voter(cluster: Cluster) -> None:
    write_raft_config(cluster.raft_config, [(NODE_IDS["n3"], ADDRESSES["n3"], Role.SPARE)])
    report = await read(cluster.readers("n1")[Source.RAFT_CONFIG])
    assert report.leader_address == ""
    assert [r.role for r in report.records] == [Role.SPARE]


# --- the truststore ---------------------------------------------------------------------------------------


def good_entry(identities: dict[str, pki.Identity], name: str = "n4") -> str:
    certificate = "\n".join("  " + line for line in pem(identities, "n4").splitlines())
    return f"name: {name}\naddress: 10.0.0.4:9000\ncertificate: |\n{certificate}\n"


@pytest.mark.parametrize(
    ("file_name", "content", "reason"),
    [
        ("stray.txt", "anything", "not a .yaml file"),
        ("n4.yaml", "name: [n4\n", "YAML does not parse: "),
        ("n4.yaml", "- n4\n", "not a YAML mapping"),
        ("n4.yaml", "address: 10.0.0.4:9000\ncertificate: x\n", "name missing or empty"),
        ("n4.yaml", "name: ''\naddress: 10.0.0.4:9000\ncertificate: x\n", "name missing or empty"),
        ("n4.yaml", "name: n4\ncertificate: x\n", "address missing or empty"),
        ("n4.yaml", "name: n4\naddress: 10.0.0.4:9000\n", "certificate missing or empty"),
        ("n4.yaml", "name: n4\naddress: 10.0.0.4:9000\ncertificate: 7\n", "certificate missing or empty"),
        (
            "n4.yaml",
            "name: n4\naddress: 10.0.0.4:9000\ncertificate: garbage\n",
            "certificate does not parse: ",
        ),
        ("n4.yaml", "", "not a YAML mapping"),
    ],
)
async def test_invalid_truststore_entry_is_reported_beside_the_good_ones(
    cluster: Cluster, file_name: str, content: str, reason: str
) -> None:
    (cluster.truststore("n1") / file_name).write_text(content)
    report = await read(TruststoreReader(cluster.truststore("n1")))
    assert report.error == ""
    assert [r.name for r in report.records] == list(NAMES)
    [invalid] = report.invalid_entries
    assert invalid.entry == file_name
    assert invalid.reason.startswith(reason)


async def test_subdirectory_is_an_invalid_entry(cluster: Cluster) -> None:
    (cluster.truststore("n1") / "n4.yaml").mkdir()
    report = await read(TruststoreReader(cluster.truststore("n1")))
    assert report.invalid_entries == (InvalidEntry("n4.yaml", "not a .yaml file"),)


def _written_through(path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of the temporary file write_atomically wrote path through."""
    names: list[str] = []
    replace = os.replace

    def recorded(source: str, target: str) -> None:
        names.append(Path(source).name)
        replace(source, target)

    monkeypatch.setattr(os, "replace", recorded)
    write_atomically(path, path.read_bytes())
    monkeypatch.undo()
    return names[0]


@pytest.mark.parametrize("writer", ["microcluster", "memberguard"])
async def test_a_write_in_flight_is_no_entry_and_one_left_by_a_crash_is_invalid(
    cluster: Cluster, writer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A temporary file, microcluster's (renameio) or memberguard's own: unseen while young (a check during a repair's
    write saw an invalid entry that was gone a moment later), an invalid entry once older than a write takes
    (microcluster's own Replace fails on it)."""
    record = cluster.truststore("n1") / "n3.yaml"
    name = ".n3.yaml2066200893" if writer == "microcluster" else _written_through(record, monkeypatch)
    temporary = cluster.truststore("n1") / name
    temporary.write_text((cluster.truststore("n1") / "n3.yaml").read_text()[:20])
    reader = TruststoreReader(cluster.truststore("n1"))
    young = await read(reader)
    assert ([r.name for r in young.records], young.invalid_entries) == (list(NAMES), ())
    left = time.time() - IN_FLIGHT - 1
    os.utime(temporary, (left, left))
    old = await read(reader)
    assert [r.name for r in old.records] == list(NAMES)
    assert old.invalid_entries == (InvalidEntry(temporary.name, "the temporary file of an interrupted write"),)


async def test_misnamed_entry_counts_and_is_reported(cluster: Cluster, identities: dict[str, pki.Identity]) -> None:
    (cluster.truststore("n1") / "n5.yaml").write_text(good_entry(identities, name="n4"))
    report = await read(TruststoreReader(cluster.truststore("n1")))
    assert [(r.name, r.entry) for r in report.records] == [
        ("n1", "n1.yaml"),
        ("n2", "n2.yaml"),
        ("n3", "n3.yaml"),
        ("n4", "n5.yaml"),
    ]
    assert report.records[3].certificate_fingerprint == identities["n4"].fingerprint
    assert report.invalid_entries == (InvalidEntry("n5.yaml", "misnamed: file n5.yaml holds name n4"),)


async def test_an_entry_written_by_hand_as_microcluster_does_reads_back(
    cluster: Cluster, identities: dict[str, pki.Identity]
) -> None:
    (cluster.truststore("n1") / "n4.yaml").write_text(good_entry(identities))
    report = await read(TruststoreReader(cluster.truststore("n1")), include_certificates=True)
    assert report.invalid_entries == ()
    assert report.records[3] == MemberRecord(
        name="n4",
        address="10.0.0.4:9000",
        certificate_fingerprint=identities["n4"].fingerprint,
        entry="n4.yaml",
    )
    assert report.records[3].certificate_pem == pem(identities, "n4")


async def test_missing_truststore_directory_is_an_error(tmp_path: Path) -> None:
    report = await read(TruststoreReader(tmp_path / "absent"))
    assert "No such file or directory" in report.error
    assert report.records == ()


async def test_file_where_the_truststore_directory_should_be_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "truststore").write_text("")
    report = await read(TruststoreReader(tmp_path / "truststore"))
    assert "Not a directory" in report.error


async def test_truststore_sees_changes_and_reuses_unchanged_records(
    cluster: Cluster, identities: dict[str, pki.Identity]
) -> None:
    directory = cluster.truststore("n1")
    reader = TruststoreReader(directory)
    first = await read(reader)
    again = await read(reader)
    assert all(a is b for a, b in zip(first.records, again.records, strict=True))

    write_truststore_entry(directory, "n2", "10.0.0.22:9000", pem(identities, "n2"))
    remove_truststore_entry(directory, "n3")
    write_truststore_entry(directory, "n4", "10.0.0.4:9000", pem(identities, "n4"))
    changed = await read(reader)
    assert [(r.name, r.address) for r in changed.records] == [
        ("n1", ADDRESSES["n1"]),
        ("n2", "10.0.0.22:9000"),
        ("n4", "10.0.0.4:9000"),
    ]
    assert changed.records[0] is first.records[0]


def test_truststore_writers_are_atomic_and_keep_microclusters_modes(
    tmp_path: Path, identities: dict[str, pki.Identity]
) -> None:
    directory = tmp_path / "truststore"
    for address in ("10.0.0.4:9000", "10.0.0.44:9000"):
        write_truststore_entry(directory, "n4", address, pem(identities, "n4"))
    assert os.listdir(directory) == ["n4.yaml"]
    assert directory.stat().st_mode & 0o777 == 0o700
    assert (directory / "n4.yaml").stat().st_mode & 0o777 == 0o644
    assert load_yaml((directory / "n4.yaml").read_bytes()) == {
        "name": "n4",
        "address": "10.0.0.44:9000",
        "certificate": pem(identities, "n4"),
    }
    remove_truststore_entry(directory, "n4")
    remove_truststore_entry(directory, "n4")
    assert os.listdir(directory) == []


@pytest.mark.parametrize("name", ["", ".", "..", "../n4", "a/b"])
def test_truststore_writer_refuses_names_that_leave_the_directory(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="member name"):
        write_truststore_entry(tmp_path, name, "10.0.0.4:9000", "")


# --- the file cache ---------------------------------------------------------------------------------------


def test_file_cache_parses_once_per_version(tmp_path: Path) -> None:
    parsed: list[bytes] = []

    def parse(path: str, data: bytes) -> bytes:
        parsed.append(data)
        if data == b"bad":
            raise MalformedFile("bad content")
        return data

    cache = FileCache(parse)
    path = tmp_path / "f"
    path.write_bytes(b"one")
    first = cache.load(str(path))
    assert cache.load(str(path)) is first
    assert first.content == b"one"
    assert parsed == [b"one"]

    path.write_bytes(b"two!")  # in place, so only the size and mtime tell
    assert cache.load(str(path)).content == b"two!"
    path.write_bytes(b"bad")
    content = cache.load(str(path)).content
    assert isinstance(content, MalformedFile) and str(content) == "bad content"
    assert parsed == [b"one", b"two!", b"bad"]

    os.utime(path, ns=(0, 10**18 * 4))  # an mtime in the future: a newer version, whatever the clock says
    assert cache.load(str(path)).mtime == 4 * 10**9


# --- the members table ------------------------------------------------------------------------------------


async def test_members_table_reports_duplicate_addresses_and_ghost_rows_verbatim(
    tmp_path: Path, identities: dict[str, pki.Identity]
) -> None:
    table = tmp_path / "members.db"
    create_members_table(table)
    upsert_member(table, "n1", "10.0.0.1:9000", pem(identities, "n1"), "voter")
    upsert_member(table, "n2", "10.0.0.1:9000", pem(identities, "n2"), "stand-by")
    upsert_member(table, "n3", "10.0.0.3:9000", pem(identities, "n3"), "")
    upsert_member(table, "n4", "10.0.0.4:9000", pem(identities, "n4"), "PENDING")
    report = await read(MembersTableReader(table))
    assert report.error == "" and report.invalid_entries == ()
    assert [(r.name, r.address, r.role, r.role_text, r.entry) for r in report.records] == [
        ("n1", "10.0.0.1:9000", Role.VOTER, "voter", "row 1"),
        ("n2", "10.0.0.1:9000", Role.STAND_BY, "stand-by", "row 2"),
        ("n3", "10.0.0.3:9000", None, "", "row 3"),
        ("n4", "10.0.0.4:9000", Role.PENDING, "PENDING", "row 4"),
    ]


async def test_members_table_upsert_and_delete(tmp_path: Path, identities: dict[str, pki.Identity]) -> None:
    table = tmp_path / "members.db"
    create_members_table(table)
    create_members_table(table)
    reader = MembersTableReader(table)
    upsert_member(table, "n1", "10.0.0.1:9000", pem(identities, "n1"), "PENDING")
    upsert_member(table, "n2", "10.0.0.2:9000", pem(identities, "n2"), "spare")
    assert [r.role for r in (await read(reader)).records] == [Role.PENDING, Role.SPARE]
    upsert_member(table, "n1", "10.0.0.11:9000", pem(identities, "n1"), "unknown role")
    delete_member(table, "n2")
    delete_member(table, "n2")
    report = await read(reader)  # the kept connection sees other connections' writes
    assert [(r.name, r.address, r.role, r.role_text) for r in report.records] == [
        ("n1", "10.0.0.11:9000", None, "unknown role")
    ]
    with pytest.raises(sqlite3.IntegrityError):
        upsert_member(table, "n9", "10.0.0.9:9000", pem(identities, "n1"), "voter")


async def test_members_table_bad_rows_are_invalid_entries(tmp_path: Path, identities: dict[str, pki.Identity]) -> None:
    table = tmp_path / "members.db"
    create_members_table(table)
    upsert_member(table, "n1", "10.0.0.1:9000", "not a certificate", "voter")
    with closing(sqlite3.connect(table)) as connection, connection:
        connection.execute("UPDATE core_cluster_members SET address = x'00' WHERE name = 'n1'")
    upsert_member(table, "n2", "10.0.0.2:9000", "not a certificate either", "voter")
    report = await read(MembersTableReader(table))
    assert report.invalid_entries[0] == InvalidEntry("row 1", "a column holds a value that is not text")
    assert report.invalid_entries[1].entry == "row 2"
    assert report.invalid_entries[1].reason.startswith("certificate does not parse: ")
    # microcluster never parses the column, so the row is still a member
    assert report.records == (
        MemberRecord(name="n2", address="10.0.0.2:9000", role=Role.VOTER, role_text="voter", entry="row 2"),
    )


async def test_members_table_errors_and_recovery(tmp_path: Path, identities: dict[str, pki.Identity]) -> None:
    table = tmp_path / "members.db"
    reader = MembersTableReader(table)
    assert "No such file or directory" in (await read(reader)).error

    table.write_bytes(b"this is not a database, but long enough to have a header" * 20)
    assert "file is not a database" in (await read(reader)).error

    table.unlink()
    sqlite3.connect(table).close()
    assert "no such table: core_cluster_members" in (await read(reader)).error

    create_members_table(table)
    upsert_member(table, "n1", "10.0.0.1:9000", pem(identities, "n1"), "voter")
    assert [r.name for r in (await read(reader)).records] == ["n1"]

    # A file replaced under the kept connection is read anew, not through the old inode.
    replacement = tmp_path / "replacement.db"
    create_members_table(replacement)
    upsert_member(replacement, "n2", "10.0.0.2:9000", pem(identities, "n2"), "voter")
    os.replace(replacement, table)
    assert [r.name for r in (await read(reader)).records] == ["n2"]
    table.unlink()
    assert "No such file or directory" in (await read(reader)).error


# --- cluster.yaml and info.yaml ---------------------------------------------------------------------------


async def test_raft_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    reader = RaftConfigFileReader(path, Source.RAFT_CACHE)
    assert "No such file or directory" in (await read(reader)).error
    for content, error in [
        ("", "empty file"),
        ("- [", "YAML does not parse: "),
        ("ID: 1\n", "not a YAML list of nodes"),
    ]:
        path.write_text(content)
        report = await read(reader)
        assert report.error.startswith(f"{path}: {error}")
        assert report.changed_at is not None
    (tmp_path / "dir.yaml").mkdir()
    assert (await read(RaftConfigFileReader(tmp_path / "dir.yaml", Source.RAFT_CONFIG))).error


async def test_raft_config_bad_items_are_invalid_entries(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "- {ID: 1, Address: '10.0.0.1:9000', Role: 0}\n"
        "- {ID: 2, Address: '10.0.0.2:9000', Role: 7}\n"
        "- {ID: -3, Address: '10.0.0.3:9000', Role: 1}\n"
        "- {ID: 4, Role: 1}\n"
        "- {ID: 5, Address: '10.0.0.5:9000', Role: true}\n"
        "- just a string\n"
        "- {ID: 0, Address: '10.0.0.7:9000', Role: 1}\n"
    )
    report = await read(RaftConfigFileReader(path, Source.RAFT_CONFIG))
    assert report.records == (
        MemberRecord(address="10.0.0.1:9000", node_id=1, role=Role.VOTER, entry="entry 1"),
        MemberRecord(address="10.0.0.7:9000", node_id=0, role=Role.STAND_BY, entry="entry 7"),
    )
    assert [(e.entry, e.reason) for e in report.invalid_entries] == [
        ("entry 2", "Role 7 is not 0 (voter), 1 (stand-by) or 2 (spare)"),
        ("entry 3", "ID -3 is not a dqlite node ID (an unsigned 64-bit integer)"),
        ("entry 4", "Address missing or empty"),
        ("entry 5", "Role True is not 0 (voter), 1 (stand-by) or 2 (spare)"),
        ("entry 6", "not a mapping of ID, Address and Role"),
    ]


def test_raft_config_reader_serves_only_raft_sources(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NODE_INFO"):
        RaftConfigFileReader(tmp_path / "cluster.yaml", Source.NODE_INFO)


async def test_node_info(tmp_path: Path) -> None:
    path = tmp_path / "database" / "info.yaml"
    reader = NodeInfoReader(path)
    assert "No such file or directory" in (await read(reader)).error

    write_node_info(path, 2**64 - 1, "10.0.0.1:9000", Role.STAND_BY)
    assert path.read_text() == "ID: 18446744073709551615\nAddress: 10.0.0.1:9000\nRole: 1\n"
    assert (await read(reader)).records == (
        MemberRecord(address="10.0.0.1:9000", node_id=2**64 - 1, role=Role.STAND_BY, entry="info.yaml"),
    )

    path.write_text("ID: 1\nAddress: ''\nRole: 0\n")
    report = await read(reader)
    assert report.error == "" and report.records == ()
    assert report.invalid_entries == (InvalidEntry("info.yaml", "Address missing or empty"),)

    path.write_text("ID: [1\n")
    assert "YAML does not parse" in (await read(reader)).error


def test_raft_writers_are_atomic_and_refuse_pending(tmp_path: Path) -> None:
    path = tmp_path / "database" / "cluster.yaml"
    write_raft_config(path, [(1, "10.0.0.1:9000", Role.VOTER)])
    write_raft_config(path, [(1, "10.0.0.1:9000", Role.VOTER), (2, "10.0.0.2:9000", Role.SPARE)])
    assert os.listdir(path.parent) == ["cluster.yaml"]
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert load_yaml(path.read_bytes()) == [
        {"ID": 1, "Address": "10.0.0.1:9000", "Role": 0},
        {"ID": 2, "Address": "10.0.0.2:9000", "Role": 2},
    ]
    before = path.read_bytes()
    with pytest.raises(ValueError, match="PENDING"):
        write_raft_config(path, [(3, "10.0.0.3:9000", Role.PENDING)])
    assert os.listdir(path.parent) == ["cluster.yaml"]
    assert path.read_bytes() == before
