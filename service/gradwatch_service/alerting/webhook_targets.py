"""Which webhook URLs the service may POST to, decided on the addresses their host resolves to (decision 8).

A URL is refused when any address its host resolves to is loopback, private (RFC 1918, IPv6 ULA), link-local
(169.254/16 and fe80::/10, where cloud metadata lives), unspecified, multicast, reserved, shared (100.64/10) or
otherwise not globally routable, IPv4-mapped and 6to4 IPv6 forms included, and when the host is a cloud-metadata
name. The check runs on the resolver's answers, so every spelling the C library accepts (`2130706433`, `0x7f.1`,
`[::ffff:127.0.0.1]`) is judged by the address it means. It runs when a subscription is created or changed and
again before every delivery, and the delivery connects to the address that was checked (`CheckedTarget.address`),
so a DNS answer that changes between the check and the connection (rebinding) cannot redirect it.

`GRADWATCH_WEBHOOK_ALLOWED_TARGETS` names hosts, addresses and networks that are allowed although they are not
public (a receiver on 127.0.0.1, a team's 10.0.0.0/8); `GRADWATCH_WEBHOOK_ALLOW_PRIVATE_TARGETS` allows every
such address at once. Cloud-metadata names and addresses stay refused whatever is allowed.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["CLOUD_METADATA_ADDRESSES", "CLOUD_METADATA_NAMES", "CheckedTarget", "Resolver", "TargetPolicy",
           "TargetRefused", "check_target", "system_resolver"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]
"""host, port -> the addresses it resolves to, as strings (the seam tests use to play DNS)."""

CLOUD_METADATA_NAMES = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog", "metadata.internal", "instance-data",
    "instance-data.ec2.internal", "metadata.azure.internal", "metadata.oraclecloud.com",
})
CLOUD_METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean
    "169.254.170.2",  # AWS ECS task metadata
    "fd00:ec2::254",  # AWS over IPv6
    "100.100.100.200",  # Alibaba Cloud
    "192.0.0.192",  # Oracle Cloud
))


class TargetRefused(ValueError):
    """A URL the policy does not allow: the message says which address and why."""


def system_resolver(host: str, port: int) -> list[str]:
    """Every A and AAAA answer for `host`, through the C library (so numeric spellings resolve as they would
    for a connection). Raises OSError when the name does not resolve."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _unwrapped(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (IPv4-mapped ::ffff:a.b.c.d, 6to4 2002:a.b.c.d::), else itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is not None:
            return inner
    return ip


def address_problem(ip: IPAddress) -> str | None:
    """What makes an address unfit to receive webhooks without an allow-list entry, or None if it is public."""
    ip = _unwrapped(ip)
    if ip in CLOUD_METADATA_ADDRESSES:
        return "a cloud metadata address"
    for kind, test in (("loopback", ip.is_loopback), ("unspecified", ip.is_unspecified),
                       ("link-local", ip.is_link_local), ("multicast", ip.is_multicast)):
        if test:
            return f"a {kind} address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return "a shared (carrier-grade NAT) address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:  # fec0::/10: ipaddress calls it global
        return "a site-local address"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "not a globally routable address"
    return None


_SHARED = ipaddress.ip_network("100.64.0.0/10")


@dataclass(frozen=True)
class TargetPolicy:
    """What the settings allow beyond public addresses."""

    allowed_names: frozenset[str] = frozenset()
    allowed_networks: tuple[IPNetwork, ...] = ()
    allow_private: bool = False

    @classmethod
    def parse(cls, allowed_targets: str, allow_private: bool = False) -> TargetPolicy:
        """From GRADWATCH_WEBHOOK_ALLOWED_TARGETS: comma-separated host names, addresses and CIDR networks."""
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in (e.strip() for e in allowed_targets.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                if not all(part and (part.isalnum() or set(part) <= _NAME_CHARS) for part in entry.split(".")):
                    raise ValueError(f"{entry!r} is neither a host name, an IP address nor a CIDR network") from None
                names.add(_normal_name(entry))
        return cls(frozenset(names), tuple(networks), allow_private)

    def allows(self, ip: IPAddress) -> bool:
        """Whether an allowed network holds the address (or the IPv4 address an IPv6 one carries)."""
        forms = {ip, _unwrapped(ip)}
        return any(a.version == net.version and a in net for net in self.allowed_networks for a in forms)


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def _normal_name(host: str) -> str:
    return host.lower().rstrip(".")


@dataclass(frozen=True)
class CheckedTarget:
    """A URL that passed: the name to send as Host and TLS server name, and the address to connect to."""

    host: str
    port: int
    address: str


def check_target(url: str, policy: TargetPolicy, resolve: Resolver = system_resolver) -> CheckedTarget:
    """Resolve the URL's host and check every address; raises TargetRefused, or OSError when it does not
    resolve (which may pass: the name may exist later, and every delivery checks again)."""
    parts = urlsplit(url)
    host = _normal_name(parts.hostname or "")
    if not host:
        raise TargetRefused("the URL has no host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if host in CLOUD_METADATA_NAMES or host.endswith(".metadata.google.internal"):
        raise TargetRefused(f"{host} is a cloud metadata name")
    if "%" in host:  # fe80::1%eth0: an address that means something only on this host's own link
        raise TargetRefused(f"{host} names a zone (interface): an address of this host's own link")
    try:
        answers = resolve(host, port)
    except (UnicodeError, ValueError) as exc:  # a label too long for IDNA, say: no name at all
        raise TargetRefused(f"{host!r} is not a valid host name: {exc}") from None
    addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in answers]  # without fe80::1%eth0's %scope
    if not addresses:
        raise OSError(f"{host} resolves to no address")
    named = host in policy.allowed_names
    for ip in addresses:
        problem = address_problem(ip)
        if problem is None:
            continue
        if problem == "a cloud metadata address":
            raise TargetRefused(f"{host} resolves to {ip}, a cloud metadata address")
        if not (named or policy.allow_private or policy.allows(ip)):
            shown = host if host == str(ip) else f"{host} resolves to {ip}, which"
            raise TargetRefused(f"{shown} is {problem}: name it in GRADWATCH_WEBHOOK_ALLOWED_TARGETS to allow it")
    return CheckedTarget(host=host, port=port, address=str(addresses[0]))
