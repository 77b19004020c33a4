"""LAN discovery of dispatchers over mDNS / DNS-SD (python-zeroconf).

A dispatcher that listens on a non-loopback address advertises one `_octaskly._tcp.local.`
service instance pointing at its P2P port; a worker given no dispatcher address browses for
that type and tries what it finds.

Discovery only *finds* a dispatcher, it proves nothing: anyone on the LAN can advertise the
service type. The worker still has to complete the cluster-key handshake with whatever it
connects to, and that authentication decides whether the peer is a dispatcher of this cluster.
A spoofed advertisement can at worst waste a connection attempt.

What is published is public to the whole link: the instance name (derived from the caller's
name, e.g. host name and port), a host name for the SRV record, the P2P port, the addresses,
and TXT properties the caller chooses - in octaskly `v` (octaskly version), `proto` (P2P
protocol version) and `quic` (`1` when QUIC is also accepted on the port). Never put a secret
in the TXT properties.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import re
import socket
import unicodedata
from collections.abc import Callable, Iterable, Sequence

import ifaddr
from zeroconf import Error as ZeroconfError
from zeroconf import ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_octaskly._tcp.local."
SETTLE_SECONDS = 0.3
_FALLBACK_INSTANCE = "octaskly"
_LABEL_LIMIT = 63  # bytes in one DNS label (RFC 1035)
_RENAME_ROOM = 4  # zeroconf renames a conflicting instance "<label>-2", "-3"... in place
_TXT_ENTRY_LIMIT = 255  # bytes in one TXT key=value string (RFC 6763 6.1)
_ZEROCONF_ERRORS = (OSError, RuntimeError, ValueError, ZeroconfError)

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# -- names and TXT records ------------------------------------------------------------------
def _truncate_utf8(text: str, limit: int) -> str:
    """The longest prefix of `text` whose UTF-8 encoding fits in `limit` bytes."""
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def instance_label(name: str) -> str:
    """`name` as one valid DNS-SD instance label: no control or format characters, no dots
    (python-zeroconf does not escape them), whitespace collapsed, and short enough (59 UTF-8
    bytes) that zeroconf's "-N" suffix on a name conflict keeps it within 63 bytes."""
    kept = (
        " " if ch.isspace() else "-" if ch in ".\\" else ch
        for ch in unicodedata.normalize("NFC", name)
        if ch.isspace() or not unicodedata.category(ch).startswith("C")
    )
    label = _truncate_utf8(" ".join("".join(kept).split()), _LABEL_LIMIT - _RENAME_ROOM)
    label = label.strip()
    return label or _FALLBACK_INSTANCE


def host_label(name: str) -> str:
    """An ASCII host label (`octaskly-<slug>-<hash>`) for the SRV target of `name`; the hash
    keeps names that differ only outside ASCII apart."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:40].strip("-")
    digest = hashlib.sha256(name.encode("utf-8", errors="replace")).hexdigest()[:8]
    return "-".join(part for part in ("octaskly", slug, digest) if part)


def _txt_key_ok(key: str) -> bool:
    return bool(key) and "=" not in key and all(" " <= ch <= "~" for ch in key)


def txt_properties(properties: dict[str, str]) -> dict[str, str]:
    """The properties as valid TXT strings: bad keys dropped, each entry cut to 255 bytes."""
    result: dict[str, str] = {}
    for key, value in properties.items():
        if not _txt_key_ok(key) or len(key) >= _TXT_ENTRY_LIMIT:
            log.warning("discovery: TXT key %r is not printable ASCII without '=': dropped", key)
            continue
        result[key] = _truncate_utf8(value, _TXT_ENTRY_LIMIT - len(key) - 1)
    return result


# -- addresses ------------------------------------------------------------------------------
def _parse_ip(text: str) -> _IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _advertisable(addr: _IPAddress) -> bool:
    """Reachable from the LAN without a scope id: not loopback, not unspecified, not
    IPv6 link-local (its scope means nothing on the other host)."""
    if addr.is_loopback or addr.is_unspecified or addr.is_multicast:
        return False
    return not (addr.version == 6 and addr.is_link_local)


def host_addresses(versions: Iterable[int]) -> list[str]:
    """The host's advertisable addresses of the given IP versions, IPv4 first."""
    wanted = set(versions)
    found: list[_IPAddress] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            raw = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            addr = _parse_ip(raw)
            if addr is not None and addr.version in wanted and _advertisable(addr):
                found.append(addr)
    return [str(a) for a in sorted(set(found), key=lambda a: (a.version, a.packed))]


async def _resolve(host: str) -> list[_IPAddress]:
    """`host` as IP addresses: itself if it is a literal, else what the resolver says."""
    literal = _parse_ip(host)
    if literal is not None:
        return [literal]
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    parsed = (_parse_ip(str(info[4][0])) for info in infos)
    return list(dict.fromkeys(a for a in parsed if a is not None))


class _Plan:
    """What to advertise for a bind address, and on which interfaces (IPv4 addresses,
    IPv6 addresses or interface indexes)."""

    def __init__(self, addresses: list[str], interfaces: Sequence[str | int]) -> None:
        self.addresses = addresses
        self.interfaces = list(interfaces)


def _wildcard_plan(addr: _IPAddress) -> _Plan:
    ipv4, ipv6 = _lan_interfaces()
    if addr.version == 4:  # 0.0.0.0 accepts IPv4 only
        return _Plan(host_addresses([4]), ipv4)
    return _Plan(host_addresses([4, 6]), ipv4 + ipv6)


async def _plan(bind_address: str) -> _Plan | None:
    """None when there is nothing worth advertising (loopback only, unresolvable)."""
    try:
        resolved = await _resolve(bind_address)
    except (OSError, ValueError) as exc:
        log.warning(
            "discovery: cannot resolve bind address %r (%s): not advertising", bind_address, exc
        )
        return None
    if any(a.is_unspecified for a in resolved):
        return _wildcard_plan(next(a for a in resolved if a.is_unspecified))
    usable = [str(a) for a in sorted(resolved, key=lambda a: a.version) if _advertisable(a)]
    if not usable:
        log.debug("discovery: %s is loopback (or link-local) only: not advertising", bind_address)
        return None
    return _Plan(usable, usable)


# -- advertising ----------------------------------------------------------------------------
async def _close_zeroconf(aiozc: AsyncZeroconf) -> None:
    """Close, sending goodbyes; finishes even if the caller is cancelled meanwhile."""
    task = asyncio.ensure_future(aiozc.async_close())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])  # let the sockets close before giving up
        raise


class Advertiser:
    """Advertises one dispatcher's P2P port on the LAN until closed."""

    def __init__(self) -> None:
        self._zc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None

    @property
    def name(self) -> str | None:
        """The registered service name (zeroconf may have renamed it), None if none."""
        return self._info.name if self._info is not None and self._zc is not None else None

    async def start(
        self, *, port: int, bind_address: str, name: str, properties: dict[str, str]
    ) -> None:
        """Register the service (probing takes ~2 s). Never raises for network trouble: a
        dispatcher runs fine without discovery, so failures are logged as warnings."""
        if self._zc is not None:
            raise RuntimeError("advertiser already started")
        plan = await _plan(bind_address)
        if plan is None:
            return
        if not plan.addresses or not plan.interfaces:
            log.info("discovery: no non-loopback address on this host: not advertising")
            return
        try:
            await self._register(plan, port=port, name=name, properties=properties)
        except _ZEROCONF_ERRORS as exc:
            log.warning(
                "discovery: cannot advertise on the LAN (%s: %s); workers need --dispatcher-addr",
                type(exc).__name__,
                exc,
            )
            await self.close()

    async def _register(
        self, plan: _Plan, *, port: int, name: str, properties: dict[str, str]
    ) -> None:
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{instance_label(name)}.{SERVICE_TYPE}",
            port=port,
            properties=txt_properties(properties),
            server=f"{host_label(name)}.local.",
            parsed_addresses=plan.addresses,
        )
        self._zc = AsyncZeroconf(interfaces=plan.interfaces)
        self._info = info
        announced = await self._zc.async_register_service(info, allow_name_change=True)
        await announced
        log.info(
            "discovery: advertising %r on the LAN: %s port %d",
            info.name,
            ", ".join(plan.addresses),
            port,
        )

    async def close(self) -> None:
        """Unregister (goodbye packets) and close. Idempotent; logs instead of raising."""
        aiozc, self._zc = self._zc, None
        if aiozc is None:
            return
        try:
            await _close_zeroconf(aiozc)
        except _ZEROCONF_ERRORS as exc:
            log.warning("discovery: error while withdrawing the advertisement: %s", exc)


# -- browsing -------------------------------------------------------------------------------
def _ordered(found: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """Deduplicated, IPv4 before IPv6, otherwise in the order found."""
    unique = list(dict.fromkeys(found))
    return sorted(unique, key=lambda hp: ":" in hp[0])


class _Browse:
    """One browse: resolves each instance the browser reports, records the addresses."""

    def __init__(self, aiozc: AsyncZeroconf, deadline: float) -> None:
        self._aiozc = aiozc
        self._deadline = deadline
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen: set[str] = set()
        self.found: list[tuple[str, int]] = []
        self.first = asyncio.Event()

    def on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change is ServiceStateChange.Removed or name in self._seen:
            return
        self._seen.add(name)
        task = asyncio.get_running_loop().create_task(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        remaining_ms = max(0.0, self._deadline - asyncio.get_running_loop().time()) * 1000
        try:
            resolved = await info.async_request(self._aiozc.zeroconf, remaining_ms)
        except _ZEROCONF_ERRORS as exc:
            log.debug("discovery: cannot resolve %r: %s", name, exc)
            return
        if not resolved or info.port is None:
            return
        hosts = info.parsed_scoped_addresses()
        self.found.extend((host, info.port) for host in hosts)
        log.debug("discovery: %r at %s port %d", name, hosts, info.port)
        if hosts:
            self.first.set()

    async def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))


async def _wait_for_result(browse: _Browse, timeout: float) -> None:
    """Until the first instance resolves plus a short settle, or the timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(browse.first.wait(), timeout)
        await asyncio.sleep(max(0.0, min(SETTLE_SECONDS, deadline - loop.time())))


def _lan_interfaces() -> tuple[list[str | int], list[str | int]]:
    """(IPv4 addresses, IPv6 interface indexes) of the non-loopback interfaces. Loopback is
    left out: a dispatcher on this host advertises its LAN addresses, which multicast loop
    delivers here anyway, and `::1` only yields "network unreachable" errors."""
    ipv4: list[str | int] = []
    ipv6: list[str | int] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            addr = _parse_ip(ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip)
            if addr is None or addr.is_loopback:
                continue
            if addr.version == 4:
                ipv4.append(str(addr))
            elif adapter.index is not None:
                ipv6.append(adapter.index)
    return list(dict.fromkeys(ipv4)), list(dict.fromkeys(ipv6))


def _open_browsing_zeroconf() -> AsyncZeroconf | None:
    """Listening on every non-loopback interface, dual-stack if possible; None if none."""
    ipv4, ipv6 = _lan_interfaces()
    if ipv6:
        try:
            return AsyncZeroconf(interfaces=ipv4 + ipv6)
        except _ZEROCONF_ERRORS as exc:  # e.g. IPv6 disabled on this host
            log.debug("discovery: dual-stack mDNS unavailable (%s): IPv4 only", exc)
    if not ipv4:
        return None
    return AsyncZeroconf(interfaces=ipv4)


async def _browse(aiozc: AsyncZeroconf, timeout: float) -> list[tuple[str, int]]:
    browse = _Browse(aiozc, asyncio.get_running_loop().time() + timeout)
    handlers: list[Callable[..., None]] = [browse.on_change]
    browser = AsyncServiceBrowser(aiozc.zeroconf, SERVICE_TYPE, handlers=handlers)
    try:
        await _wait_for_result(browse, timeout)
    finally:
        await browse.cancel()
        await browser.async_cancel()
    return _ordered(browse.found)


async def discover(timeout: float) -> list[tuple[str, int]]:
    """Dispatchers advertised on the LAN as (host, port), IPv4 first; [] if none answered
    within `timeout` seconds. Returns shortly after the first one resolves."""
    try:
        aiozc = _open_browsing_zeroconf()
    except _ZEROCONF_ERRORS as exc:
        log.warning("discovery: cannot browse the LAN (%s: %s)", type(exc).__name__, exc)
        return []
    if aiozc is None:
        log.info("discovery: no non-loopback network interface to browse on")
        return []
    try:
        return await _browse(aiozc, timeout)
    except _ZEROCONF_ERRORS as exc:
        log.warning("discovery: browsing failed (%s: %s)", type(exc).__name__, exc)
        return []
    finally:
        await _close_zeroconf(aiozc)


__all__ = ["SERVICE_TYPE", "Advertiser", "discover"]
