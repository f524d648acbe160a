"""The trust learned from the cluster: the member certificates the reachable truststores vouch for, by name.

The gather (`gather.py`) feeds it every observation; it answers which certificates an agent may serve (`roots`),
and, as a `Trust` (auth.py) beside the registry, which member certificates the coordinator's own server accepts.
It is what the cluster itself trusts, re-learned at every gather, so a certificate removed from every truststore
stops being trusted at the next gather.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from coordinator.auth import Peer, Principal
from coordinator.core.model import MemberRecord, NodeObservation, Source
from coordinator.registry import RegisteredMember


class LearnedTrust:
    def __init__(self) -> None:
        # Replaced whole, never mutated: the TLS stack reads them from its own threads (peers, bundle).
        self._pems: dict[str, str] = {}  # fingerprint → PEM, as truststores reported them
        self._vouched: dict[str, frozenset[str]] = {}  # member name → fingerprints truststores hold for it

    def learn(self, observations: Iterable[NodeObservation]) -> bool:
        """Records which certificates the reachable truststores hold; True if some PEM is still unknown."""
        observations = list(observations)
        vouched: dict[str, set[str]] = {}
        pems = dict(self._pems)
        for observation in observations:
            for record in _truststore_records(observation):
                vouched.setdefault(record.name, set()).add(record.certificate_fingerprint)
                if record.certificate_pem:
                    pems[record.certificate_fingerprint] = record.certificate_pem
        self._pems = pems
        self._vouched = {name: frozenset(fps) for name, fps in vouched.items()}
        return any(self.lacks_certificates(o) for o in observations)

    def lacks_certificates(self, observation: NodeObservation) -> bool:
        """Whether observation's truststore names a certificate whose PEM has not been seen yet."""
        return any(r.certificate_fingerprint not in self._pems for r in _truststore_records(observation))

    def holders(self, observations: Sequence[NodeObservation]) -> list[NodeObservation]:
        """Few observations whose truststores name, between them, every certificate whose PEM has not been seen yet:
        whom to ask for the PEMs. Truststores mostly agree, so one node usually holds them all; asking every node
        would send every PEM N times (at N = 100, 10 MB to learn 100 certificates)."""
        unknown = {
            id(o): {r.certificate_fingerprint for r in _truststore_records(o)} - self._pems.keys() for o in observations
        }
        chosen: list[NodeObservation] = []
        left = set().union(*unknown.values())
        while left:
            best = max(observations, key=lambda o: len(unknown[id(o)] & left))
            chosen.append(best)
            left -= unknown[id(best)]
        return chosen

    def roots(self, member: RegisteredMember) -> bytes:
        """The certificates member's agent may serve: the one the registry pins, then those vouched for its name."""
        pems = [member.certificate_pem] if member.certificate_pem else []
        pems += sorted(self._pems[fp] for fp in self._vouched.get(member.name, ()) if fp in self._pems)
        return "".join(dict.fromkeys(pems)).encode()

    def certificates(self, pinned: Iterable[RegisteredMember]) -> dict[str, str]:
        """Member name → certificate PEM: what the registry pins, else what the truststores vouch for."""
        known = {name: self._pems[fp] for name, fps in self._vouched.items() for fp in sorted(fps) if fp in self._pems}
        known.update({m.name: m.certificate_pem for m in pinned if m.certificate_pem})
        return known

    def peers(self) -> Mapping[str, Peer]:
        """Trust for the coordinator's own server: the member certificates the truststores vouch for."""
        return {
            fp: Peer(Principal.MEMBER, name, fp)
            for name, fps in self._vouched.items()
            for fp in fps
            if fp in self._pems
        }

    def bundle(self) -> bytes:
        return "".join(
            sorted(self._pems[fp] for fps in self._vouched.values() for fp in fps if fp in self._pems)
        ).encode()


def _truststore_records(observation: NodeObservation) -> tuple[MemberRecord, ...]:
    report = observation.view.report(Source.TRUSTSTORE) if observation.view else None
    return report.records if report and not report.error else ()
