"""The operator's command line: what it needs from the container it runs in."""

import os
import pwd
import socket
from typing import Any

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


@pytest.mark.cluster
def test_await_peering_waits_for_the_object_and_never_creates_it(
    kube: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from kubernetes.client import CustomObjectsApi

    from edgefleet_operator import handlers

    monkeypatch.setattr(handlers, "kube_client", lambda: kube)  # the local API server, as admin
    api, name = CustomObjectsApi(kube), f"await-{os.getpid()}"
    plural = ("kopf.dev", "v1", "clusterkopfpeerings")
    with pytest.raises(SystemExit, match=f"no ClusterKopfPeering '{name}' after 1.5 s"):
        cli.ensure_peering(name, await_s=1.5)
    assert name not in [p["metadata"]["name"] for p in api.list_cluster_custom_object(*plural)["items"]]
    body = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}}
    creator = threading.Timer(1.0, api.create_cluster_custom_object, (*plural, body))  # as helm would
    creator.start()
    try:
        cli.ensure_peering(name, await_s=60)  # returns once it is there; creating it would race
        creator.join()
        assert api.get_cluster_custom_object(*plural, name)["metadata"]["name"] == name
    finally:
        creator.join()
        api.delete_cluster_custom_object(*plural, name)
