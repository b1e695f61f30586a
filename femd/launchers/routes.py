"""The routes of a task's network: addresses inside, destinations outside, peers.

Owns the pure planning of ``TaskNetwork`` (``network``): each allowed egress
destination's loopback address inside the sandbox (``plan_routes``), the
sandbox's ``/etc/hosts`` (``hosts_file``), and the resolution, at launch, of
destinations (``resolve``) and ingress peers (``peer_networks``). Opens no
socket but the resolver's.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from typing import NamedTuple

from femd.errors import LaunchError, cut
from femd.launchers.profile import NetworkSettings

__all__ = [
    "Address",
    "Route",
    "hosts_file",
    "peer_address",
    "peer_networks",
    "plan_routes",
    "resolve",
]

logger = logging.getLogger(__name__)

Address = ipaddress.IPv4Network | ipaddress.IPv6Network


class Route(NamedTuple):
    """One allowed egress destination."""

    allowed: str  # "host:port" as the manifest lists it
    host: str
    port: int
    inside: str  # the address the task connects to, in its namespace
    targets: tuple[tuple[str, int], ...] = ()  # resolved, outside


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def plan_routes(egress: Iterable[str]) -> list[Route]:
    """Give each egress destination its in-sandbox address (pure).

    A name gets ``127.0.1.N`` (one per name, in first-seen order, skipping
    addresses that IPv4 literals of the list use); a literal keeps its own,
    and ``localhost`` stays ``127.0.0.1``. A destination listed twice (in any
    letter case) is one route.
    """
    pairs: dict[tuple[str, int], str] = {}
    for allowed in egress:
        host, _, number = allowed.rpartition(":")
        pairs.setdefault((host.lower(), int(number)), allowed)
    taken = {h for h, _ in pairs if _is_ipv4(h)}
    names: dict[str, str] = {"localhost": "127.0.0.1"}
    free = (f"127.0.1.{n}" for n in range(1, 255))
    routes = []
    for (host, port), allowed in pairs.items():
        if _is_ipv4(host):
            inside = host
        elif host in names:
            inside = names[host]
        else:
            inside = names[host] = next(a for a in free if a not in taken)
        routes.append(Route(allowed, host, port, inside))
    return routes


def hosts_file(routes: Iterable[Route]) -> str:
    """The sandbox's ``/etc/hosts``: localhost and the allowed names only."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost"]
    seen = {"localhost"}
    for r in routes:
        if not _is_ipv4(r.host) and r.host not in seen:
            seen.add(r.host)
            lines.append(f"{r.inside}\t{r.host}")
    return "\n".join(lines) + "\n"


def resolve(
    host: str, port: int, fixed: NetworkSettings
) -> tuple[tuple[str, int], ...]:
    """Where an egress destination goes: the profile's fixed hosts, else DNS.

    Raises:
        LaunchError: the name does not resolve.
    """
    if host in fixed.hosts:
        return tuple((a, port) for a in fixed.hosts[host])
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise LaunchError(f"network: cannot resolve {cut(host)}: {cut(e)}") from e
    found: list[tuple[str, int]] = []
    for info in infos:
        target = (str(info[4][0]), port)
        if target not in found:
            found.append(target)
    return tuple(found)


def peer_networks(peers: Iterable[str]) -> list[Address]:
    """The policy's ingress peers as networks; names resolved now."""
    nets: list[Address] = []
    for peer in peers:
        try:
            nets.append(ipaddress.ip_network(peer, strict=False))
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(peer, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            # Fails closed: nobody connects as a peer that does not resolve.
            logger.warning("network: ingress peer %s does not resolve: %s", peer, e)
            continue
        nets += [ipaddress.ip_network(str(i[4][0])) for i in infos]
    return nets


def peer_address(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A peer's address as the policy's networks compare it (IPv4-mapped: IPv4)."""
    ip = ipaddress.ip_address(addr.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
