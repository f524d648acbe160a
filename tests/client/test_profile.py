"""Endpoint.from_profile: a client profile file and MEMBERGUARD_* variables, each field from the first that has it
(the caller's settings, the environment, the profile), as etcdctl reads ETCDCTL_*."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from memberguard import Client, Endpoint
from memberguard._base import ENVIRONMENT, profile_path

from coordinator.lab.lab import Lab
from coordinator.pki import make_identity, write_identity


@pytest.fixture
def material(tmp_path: Path) -> Path:
    """A profile directory holding a coordinator certificate and an operator identity, and a profile naming them
    relative to itself."""
    directory = tmp_path / "profile"
    write_identity(directory, make_identity("coordinator"), stem="coordinator")
    write_identity(directory, make_identity("operator"), stem="operator")
    profile = {
        "address": "127.0.0.1:7443",
        "ca": "coordinator.crt",
        "server_name": "coordinator",
        "cert": "operator.crt",
        "key": "operator.key",
    }
    (directory / "profile.json").write_text(json.dumps(profile))
    return directory


def test_the_profile_gives_every_field_with_paths_relative_to_itself(material: Path) -> None:
    endpoint = Endpoint.from_profile({"MEMBERGUARD_PROFILE": str(material / "profile.json")})
    assert endpoint == Endpoint.from_files(
        "127.0.0.1:7443",
        ca=material / "coordinator.crt",
        server_name="coordinator",
        cert=material / "operator.crt",
        key=material / "operator.key",
    )


def test_the_environment_overrides_the_profile_and_the_caller_overrides_both(material: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_identity(other, make_identity("operator-2"), stem="operator")
    environ = {
        "MEMBERGUARD_PROFILE": str(material / "profile.json"),
        "MEMBERGUARD_ADDRESS": "127.0.0.1:9000",
        "MEMBERGUARD_CERT": str(other / "operator.crt"),
        "MEMBERGUARD_KEY": str(other / "operator.key"),
    }
    endpoint = Endpoint.from_profile(environ)
    assert endpoint.address == "127.0.0.1:9000"
    assert endpoint.cert == (other / "operator.crt").read_bytes()
    assert endpoint.server_name == "coordinator"  # from the profile
    assert Endpoint.from_profile(environ, address="10.0.0.1:1").address == "10.0.0.1:1"


def test_the_environment_alone_is_enough(material: Path, tmp_path: Path) -> None:
    environ = {"XDG_CONFIG_HOME": str(tmp_path / "nothing-here")}
    environ |= {
        ENVIRONMENT["address"]: "127.0.0.1:7443",
        ENVIRONMENT["ca"]: str(material / "coordinator.crt"),
        ENVIRONMENT["server_name"]: "coordinator",
        ENVIRONMENT["cert"]: str(material / "operator.crt"),
        ENVIRONMENT["key"]: str(material / "operator.key"),
    }
    assert Endpoint.from_profile(environ).server_name == "coordinator"


def test_the_default_profile_is_under_xdg_config_home(material: Path, tmp_path: Path) -> None:
    config = tmp_path / "config"
    (config / "memberguard").mkdir(parents=True)
    assert profile_path({"XDG_CONFIG_HOME": str(config)}) == config / "memberguard" / "profile.json"
    assert profile_path({"HOME": str(tmp_path)}) == tmp_path / ".config" / "memberguard" / "profile.json"
    (material / "profile.json").rename(config / "memberguard" / "profile.json")
    for name in ("coordinator.crt", "operator.crt", "operator.key"):
        (material / name).rename(config / "memberguard" / name)
    assert Endpoint.from_profile({"XDG_CONFIG_HOME": str(config)}).address == "127.0.0.1:7443"


def test_what_is_missing_is_named_with_the_variables_that_would_give_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as raised:
        Endpoint.from_profile({"XDG_CONFIG_HOME": str(tmp_path)}, address="127.0.0.1:1")
    message = str(raised.value)
    assert "ca, server_name, cert, key" in message and "MEMBERGUARD_CA" in message
    assert "MEMBERGUARD_ADDRESS" not in message


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not JSON"),
        ("[]", "not a JSON object"),
        ('{"address": "127.0.0.1:1", "colour": "blue"}', "unknown field"),
        ('{"address": 7443}', "non-empty strings"),
    ],
)
def test_a_malformed_profile_is_refused_with_its_path(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "profile.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=problem) as raised:
        Endpoint.from_profile({"MEMBERGUARD_PROFILE": str(path)})
    assert str(path) in str(raised.value)


def test_a_named_profile_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Endpoint.from_profile({"MEMBERGUARD_PROFILE": str(tmp_path / "absent.json")})


def test_a_profile_reaches_a_real_coordinator(lab: Lab, tmp_path: Path) -> None:
    coordinator, operator = lab.document["coordinator"], lab.document["operator"]
    path = tmp_path / "profile.json"
    path.write_text(
        json.dumps(
            {
                "address": coordinator["address"],
                "ca": coordinator["ca"],
                "server_name": coordinator["server_name"],
                "cert": operator["cert"],
                "key": operator["key"],
            }
        )
    )
    with Client(Endpoint.from_profile({"MEMBERGUARD_PROFILE": str(path)})) as client:
        assert client.check_membership(timeout=10.0).diff.nodes


def test_the_cli_reaches_a_coordinator_through_the_environment(lab: Lab, tmp_path: Path) -> None:
    coordinator, operator = lab.document["coordinator"], lab.document["operator"]
    environ = {
        "PATH": os.environ["PATH"],
        "XDG_CONFIG_HOME": str(tmp_path),  # no profile there
        "MEMBERGUARD_ADDRESS": coordinator["address"],
        "MEMBERGUARD_CA": coordinator["ca"],
        "MEMBERGUARD_SERVER_NAME": coordinator["server_name"],
        "MEMBERGUARD_CERT": operator["cert"],
    }
    memberguard = str(Path(sys.executable).parent / "memberguard")
    missing = subprocess.run([memberguard, "check"], env=environ, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "MEMBERGUARD_KEY" in missing.stderr and "none at" in missing.stderr
    environ["MEMBERGUARD_KEY"] = operator["key"]
    found = subprocess.run(
        [memberguard, "check", "-o", "json"], env=environ, capture_output=True, text=True, timeout=60
    )
    assert found.returncode == 0, found.stderr
    assert sorted(json.loads(found.stdout)["diff"]["nodes"]) == sorted(n["name"] for n in lab.document["nodes"])
