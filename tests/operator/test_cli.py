"""The operator's command line: what it needs from the container it runs in."""

import os
import pwd
import socket

import pytest

from edgefleet_operator import cli


def test_identity_needs_no_password_entry_for_the_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    # In a Pod the uid (65532, or any `runAsUser`) may have no /etc/passwd line: kopf's own default
    # identity asks getpwuid and the operator crashed at start on a real cluster.
    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    monkeypatch.delenv("USER", raising=False)
    monkeypatch.delenv("LOGNAME", raising=False)
    monkeypatch.delenv("LNAME", raising=False)
    monkeypatch.delenv("USERNAME", raising=False)
    assert cli.operator_identity() == f"{socket.gethostname()}/{os.getpid()}"


def test_run_hands_kopf_that_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import logging

    import kopf

    seen: dict[str, object] = {}

    async def operator(**kwargs: object) -> None:  # kopf's own run loop needs a cluster
        seen.update(kwargs)

    monkeypatch.setattr(kopf, "operator", operator)
    monkeypatch.setattr(kopf, "configure", lambda **_: None)  # global logging: not in a test process
    objects_log = logging.getLogger("kopf.objects")
    monkeypatch.setattr(objects_log, "level", objects_log.level)
    assert cli.cmd_run(argparse.Namespace(verbose=False, standalone=True, liveness="")) == 0
    assert seen["identity"] == cli.operator_identity()


def test_every_replica_runs_kopf_standalone_and_leases_decide_who_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # kopf's peering would freeze every replica's handlers but one; with sharding each replica needs
    # its own (handlers.py). `--standalone` now means: no Leases, this instance writes for everything.
    import logging

    import kopf

    from edgefleet_operator import handlers

    objects_log = logging.getLogger("kopf.objects")
    monkeypatch.setattr(objects_log, "level", objects_log.level)
    seen: list[dict[str, object]] = []

    async def operator(**kwargs: object) -> None:
        seen.append(kwargs)

    monkeypatch.setattr(kopf, "operator", operator)
    monkeypatch.setattr(kopf, "configure", lambda **_: None)
    monkeypatch.setattr(handlers, "OWN_EVERYTHING", handlers.OWN_EVERYTHING)
    monkeypatch.setattr(handlers, "IDENTITY", handlers.IDENTITY)
    # An old manifest's --await-peering is accepted (and ignored).
    args = cli.build_parser().parse_args(["run", "--liveness", "", "--await-peering=120"])
    assert cli.cmd_run(args) == 0
    assert seen[-1]["standalone"] is True and "peering_name" not in seen[-1]
    assert handlers.OWN_EVERYTHING is False and cli.operator_identity() == handlers.IDENTITY
    assert cli.cmd_run(cli.build_parser().parse_args(["run", "--liveness", "", "--standalone"])) == 0
    assert seen[-1]["standalone"] is True and handlers.OWN_EVERYTHING is True
