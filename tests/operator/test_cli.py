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
