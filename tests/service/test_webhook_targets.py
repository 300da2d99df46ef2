"""Webhook targets (webhook_targets.py): refused by the addresses their host really resolves to, at subscription
and again at delivery, and the delivery connects to the address that was checked.

What is real: the C library's resolver (`localhost` from /etc/hosts, numeric spellings like `2130706433`), the
service process, both databases, the delivery worker and a receiver on 127.0.0.1. What is played: DNS for names
that exist nowhere (`*.test`), through the resolver parameter the worker and the check take. No test sends a
packet to anything but 127.0.0.1: a public address only ever appears as a resolver's answer for a name whose
delivery is refused before connecting.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, insert, select

from gradwatch_service.alerting.delivery import DeliveryWorker, send
from gradwatch_service.alerting.outbox import enqueue_incident_event
from gradwatch_service.alerting.schemas import SubscriptionCreate
from gradwatch_service.alerting.subscriptions import create_subscription
from gradwatch_service.alerting.webhook_targets import TargetPolicy, TargetRefused, check_target
from gradwatch_service.ingest import upsert_run
from gradwatch_service.schemas import RunUpsert
from gradwatch_service.settings import Settings
from gradwatch_service.storage.db import now_utc, read_connection, write_transaction
from gradwatch_service.storage.models import incidents, runs, webhook_attempts, webhook_deliveries

from ..support.databases import new_run_id
from ..support.receiver import Receiver
from ..support.serverproc import ServerProcess

PUBLIC = "1.1.1.1"  # only ever a played DNS answer: nothing connects to it
NOBODY = TargetPolicy()

REFUSED_URLS = [
    ("http://127.0.0.1:9000/hook", "loopback"),
    ("http://localhost/hook", "localhost resolves to 127.0.0.1, which is a loopback address"),
    ("http://LOCALHOST./hook", "loopback"),
    ("http://[::1]/hook", "loopback"),
    ("http://[::ffff:127.0.0.1]/hook", "loopback"),  # IPv4-mapped
    ("http://[::ffff:7f00:1]/hook", "loopback"),
    ("http://[2002:7f00:1::]/hook", "loopback"),  # 6to4 around 127.0.0.1
    ("http://2130706433/hook", "2130706433 resolves to 127.0.0.1"),  # decimal
    ("http://0x7f000001/hook", "resolves to 127.0.0.1"),  # hexadecimal
    ("http://017700000001/hook", "resolves to 127.0.0.1"),  # octal
    ("http://127.1/hook", "resolves to 127.0.0.1"),  # shortened
    ("http://0.0.0.0/hook", "unspecified"),
    ("http://[::]/hook", "unspecified"),
    ("http://10.0.0.7/hook", "private"),
    ("http://172.16.5.4/hook", "private"),
    ("http://192.168.1.1/hook", "private"),
    ("http://[fd12:3456::1]/hook", "private"),  # ULA
    ("http://100.64.0.1/hook", "shared"),
    ("http://169.254.10.10/hook", "link-local"),
    ("http://[fe80::1]/hook", "link-local"),
    ("http://224.0.0.1/hook", "multicast"),
    ("http://[ff02::1]/hook", "multicast"),
    ("http://240.0.0.1/hook", "reserved"),
    ("http://169.254.169.254/latest/meta-data", "cloud metadata address"),
    ("http://[::ffff:169.254.169.254]/", "cloud metadata address"),
    ("http://[fd00:ec2::254]/", "cloud metadata address"),
    ("http://100.100.100.200/", "cloud metadata address"),
    ("http://metadata.google.internal/computeMetadata/v1/", "cloud metadata name"),
    ("http://Metadata.Google.Internal./x", "cloud metadata name"),
    ("http://" + "a" * 64 + ".example/x", "not a valid host name"),  # a label IDNA cannot encode
]


@pytest.mark.parametrize(("url", "why"), REFUSED_URLS)
def test_the_check_refuses_what_the_host_really_resolves_to(url: str, why: str) -> None:
    with pytest.raises(TargetRefused, match=why.replace(".", r"\.")):
        check_target(url, NOBODY)  # the system's resolver: /etc/hosts and numeric forms, no network


def test_every_answer_is_checked_and_public_ones_pass() -> None:
    def two_answers(host: str, port: int) -> list[str]:
        return [PUBLIC, "10.1.2.3"]

    with pytest.raises(TargetRefused, match=r"hooks\.test resolves to 10\.1\.2\.3, which is a private address"):
        check_target("https://hooks.test/x", NOBODY, two_answers)
    ok = check_target("https://hooks.test:8443/x", NOBODY, lambda h, p: [PUBLIC, "2606:4700:4700::1111"])
    assert (ok.host, ok.port, ok.address) == ("hooks.test", 8443, PUBLIC)
    with pytest.raises(OSError):  # a name that does not resolve is not refused: delivery checks again
        check_target("https://does-not-exist.invalid/x", NOBODY)


def test_the_allow_list_names_hosts_addresses_and_networks_but_never_metadata() -> None:
    policy = TargetPolicy.parse("127.0.0.1, hooks.internal, 10.0.0.0/8, fd00::/8")
    assert check_target("http://127.0.0.1:9/x", policy).address == "127.0.0.1"
    assert check_target("http://2130706433:9/x", policy).address == "127.0.0.1"  # the address, however spelled
    mapped = ipaddress.ip_address(check_target("http://[::ffff:127.0.0.1]:9/x", policy).address)
    assert isinstance(mapped, ipaddress.IPv6Address) and str(mapped.ipv4_mapped) == "127.0.0.1"
    assert check_target("http://10.200.0.1/x", policy).address == "10.200.0.1"
    assert check_target("http://hooks.internal/x", policy, lambda h, p: ["192.168.7.7"]).address == "192.168.7.7"
    assert check_target("http://localhost/x", policy).address == "127.0.0.1"  # the address is what is allowed
    for url in ("http://127.0.0.2/x", "http://192.168.1.1/x", "http://[::1]/x"):
        with pytest.raises(TargetRefused, match="GRADWATCH_WEBHOOK_ALLOWED_TARGETS"):
            check_target(url, policy)
    everything = TargetPolicy.parse("0.0.0.0/0, ::/0, metadata.google.internal", allow_private=True)
    for url in ("http://169.254.169.254/", "http://metadata.google.internal/"):
        with pytest.raises(TargetRefused, match="metadata"):
            check_target(url, everything, lambda h, p: ["169.254.169.254"])
    assert check_target("http://192.168.1.1/x", TargetPolicy(allow_private=True)).address == "192.168.1.1"
    assert not TargetPolicy.parse("::/0").allows(ipaddress.ip_address("127.0.0.1"))  # no IPv4 in an IPv6 net
    for bad in ("10.0.0.0/33", "http://x", "a b"):
        with pytest.raises(ValueError):
            TargetPolicy.parse(bad)


def test_the_service_refuses_them_at_create_and_update(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=30, headers=getattr(server, "headers", {})) as http:
        for url, why in REFUSED_URLS:
            r = http.post("/v1/webhooks", json={"url": url})
            assert r.status_code == 422, (url, r.text)
            error = r.json()["detail"][0]
            assert error["loc"] == ["body", "url"] and why in error["msg"], (url, error)
        r = http.post("/v1/webhooks", json={"url": "https://hooks.example.com/x", "enabled": False})
        assert r.status_code == 201, r.text  # does not resolve here: allowed now, checked at every delivery
        sub_id = r.json()["id"]
        r = http.patch(f"/v1/webhooks/{sub_id}", json={"url": "http://2130706433/x"})
        assert r.status_code == 422 and "127.0.0.1" in r.text
        assert http.get(f"/v1/webhooks/{sub_id}").json()["url"] == "https://hooks.example.com/x"
        http.delete(f"/v1/webhooks/{sub_id}")


# ----------------------------------------------------------------------------------------- at delivery time

class PlayedDns:
    """A resolver for names under .test, whose answers the test changes; everything else is not found."""

    def __init__(self, answers: dict[str, Sequence[str]]) -> None:
        self.answers = dict(answers)
        self.asked: list[str] = []

    def __call__(self, host: str, port: int) -> Sequence[str]:
        self.asked.append(host)
        if host not in self.answers:
            raise OSError(f"{host}: name or service not known")
        return self.answers[host]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def _queue_one_incident(engine: Engine, url: str) -> int:
    """A subscription to `url` (stored as the API would after its check) and one delivery due for it."""
    run_id = new_run_id()
    now = now_utc()
    with write_transaction(engine) as conn:
        sub_id = create_subscription(conn, SubscriptionCreate(url=url)).id
        upsert_run(conn, run_id, RunUpsert(project="targets", layers=["a"]))
        run_pk = int(conn.execute(select(runs.c.id).where(runs.c.run_id == run_id)).scalar_one())
        conn.execute(insert(incidents).values(
            run_pk=run_pk, seq=1, signature="nonfinite", severity="critical", status="open", opened_step=3,
            last_step=3, layer="a", value=float("nan"), baseline=None, message="grad norm is NaN", evidence=None,
            opened_at=now, updated_at=now))
        assert enqueue_incident_event(conn, run_pk, 1) >= 1
    return sub_id


def _settled(engine: Engine, sub_id: int, timeout: float = 20.0) -> tuple[Any, list[Any]]:
    """The subscription's delivery once it has left `pending` or has a logged attempt, and its attempts."""
    deadline = time.monotonic() + timeout
    while True:
        with read_connection(engine) as conn:
            row = conn.execute(select(webhook_deliveries).where(webhook_deliveries.c.subscription_id == sub_id)).one()
            attempts = conn.execute(select(webhook_attempts).where(webhook_attempts.c.delivery_id == row.id)
                                    .order_by(webhook_attempts.c.attempt)).all()
        if attempts or time.monotonic() > deadline:
            return row, attempts
        time.sleep(0.05)


def _worker(engine: Engine, resolve: Callable[[str, int], Sequence[str]], **settings: Any) -> DeliveryWorker:
    s = Settings(database_url=str(engine.url), webhook_poll_s=0.05, webhook_timeout_s=2, webhook_retry_base_s=0.05,
                 **settings)
    return DeliveryWorker(engine, s, resolve=resolve).start()


def test_a_name_rebound_to_loopback_after_the_check_is_refused_at_delivery(engine: Engine,
                                                                          receiver: Receiver) -> None:
    port = int(receiver.url.split(":")[2].split("/")[0])
    dns = PlayedDns({"rebind.test": [PUBLIC]})
    url = f"http://rebind.test:{port}/hook"
    assert check_target(url, NOBODY, dns).address == PUBLIC  # what the subscription's check saw
    sub_id = _queue_one_incident(engine, url)
    dns.answers["rebind.test"] = ["127.0.0.1"]  # the attacker's DNS now points inside
    worker = _worker(engine, dns)
    try:
        row, attempts = _settled(engine, sub_id)
    finally:
        worker.stop()
    assert row.state == "dead" and len(attempts) == 1, (row, attempts)  # not retried: no retry can pass
    assert "refused before connecting: rebind.test resolves to 127.0.0.1, which is a loopback address" in \
        attempts[0].error
    assert attempts[0].status_code is None and receiver.received == []


def test_a_delivery_connects_to_the_address_it_checked_with_the_name_as_host(engine: Engine,
                                                                            receiver: Receiver) -> None:
    """The played name resolves only in the check: had the POST resolved it again, it would have failed."""
    port = int(receiver.url.split(":")[2].split("/")[0])
    dns = PlayedDns({"pinned.test": ["127.0.0.1"]})
    sub_id = _queue_one_incident(engine, f"http://pinned.test:{port}/hook")
    worker = _worker(engine, dns, webhook_allowed_targets="127.0.0.1")
    try:
        row, attempts = _settled(engine, sub_id)
    finally:
        worker.stop()
    assert [a.outcome for a in attempts] == ["delivered"], [(a.outcome, a.error) for a in attempts]
    assert receiver.received[0].headers["host"] == f"pinned.test:{port}"
    assert dns.asked == ["pinned.test"]  # once, for the check; the connection used its answer


def test_a_name_that_stops_resolving_is_an_ordinary_failure_retried(engine: Engine) -> None:
    dns = PlayedDns({})
    sub_id = _queue_one_incident(engine, "http://gone.test/hook")
    worker = _worker(engine, dns)
    try:
        row, attempts = _settled(engine, sub_id)
    finally:
        worker.stop()
    assert attempts[0].outcome == "failed" and "name or service not known" in attempts[0].error
    with read_connection(engine) as conn:
        state = conn.execute(select(webhook_deliveries.c.state).where(
            webhook_deliveries.c.subscription_id == sub_id)).scalar_one()
    assert state == "pending"  # DNS may come back: retried until the retry window (a day) has passed


def test_https_to_a_checked_address_still_names_the_host_in_tls() -> None:
    """TLS gets the URL's name as its server name (and would verify the certificate against it) while the
    connection goes to the checked address: a listener on 127.0.0.1 with no certificate records the name the
    handshake asked for, then fails it."""
    server_names: list[str | None] = []
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    def record(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        server_names.append(name)

    tls.sni_callback = record  # type: ignore[assignment]
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def handshake() -> None:
            conn, _ = listener.accept()
            with conn, contextlib.suppress(ssl.SSLError, OSError):
                tls.wrap_socket(conn, server_side=True).close()

        thread = threading.Thread(target=handshake)
        thread.start()
        dns = PlayedDns({"pinned.test": ["127.0.0.1"]})
        outcome = send(f"https://pinned.test:{port}/hook", b"{}", {}, 5.0, TargetPolicy.parse("127.0.0.1"), dns)
        thread.join(10)
    assert server_names == ["pinned.test"]
    assert outcome.status_code is None and not outcome.final and "SSL" in (outcome.error or "")
