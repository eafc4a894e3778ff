"""Which hosts and addresses a crawler fed untrusted URLs may contact (the SSRF policy), as plain functions.

Two checks, both needed:

- :func:`host_refusal` looks at the URL's host *before* anything is resolved or sent: IP literals in every form
  a resolver accepts (``2130706433``, ``0x7f.1``, ``017700000001``, ``127.1``, a trailing dot, IPv6 in brackets)
  and ``localhost`` names. Resolvers differ on these forms (glibc reads ``0x7f.1`` as 127.0.0.1, others call it
  a name), so the decision must not depend on the resolver of the worker.
- :func:`address_allowed` judges every address a host resolves to, at connect time (``http.py``), including
  IPv6 forms that carry an IPv4 address to its destination: IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible
  ``::a.b.c.d``, SIIT ``::ffff:0:a.b.c.d``, NAT64 ``64:ff9b::/96`` (RFC 6052), 6to4 ``2002::/16``, Teredo
  ``2001::/32`` (server and client) and ISATAP interface ids. Such an address is judged by the IPv4 address it
  carries (an ISATAP one by its prefix as well, which may be link-local or private); the local-use NAT64 prefix
  ``64:ff9b:1::/48`` (RFC 8215) places it where the operator chooses, so the whole prefix counts as private.
"""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv6Address

_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible addresses (and :: and ::1)
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT, RFC 2765
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix, RFC 6052
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # local-use NAT64, RFC 8215
_ISATAP_ID = 0x00005EFE  # interface id 0000:5efe or 0200:5efe (the u/l bit), then the IPv4 address


def embedded_ipv4(addr: IPv6Address) -> list[IPv4Address] | None:
    """The IPv4 addresses an IPv6 address carries to its destination, or ``None`` when it carries none."""
    low = IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.ipv4_mapped is not None:
        return [addr.ipv4_mapped]
    if addr in _COMPATIBLE:
        return [low] if int(addr) > 1 else None  # :: and ::1 are addresses of their own
    if addr in _TRANSLATED or addr in _NAT64:
        return [low]
    if addr.sixtofour is not None:
        return [addr.sixtofour]
    if addr.teredo is not None:
        return list(addr.teredo)  # (server, client): either may be the one that reaches inside
    if _is_isatap(addr):
        return [low]
    return None


def _is_isatap(addr: IPv6Address) -> bool:
    return (int(addr) >> 32) & 0xFDFFFFFF == _ISATAP_ID


def _plain_allowed(addr: IPv4Address | IPv6Address, allow_loopback: bool, allow_private: bool) -> bool:
    if addr.is_loopback:
        return allow_loopback
    if addr.is_global and not addr.is_multicast and not addr.is_reserved:
        return True
    return allow_private


def address_allowed(ip: str, allow_loopback: bool, allow_private: bool) -> bool:
    """Whether an IP address may be contacted: public ones always; loopback and the rest only when allowed.

    Args:
        ip: An IPv4 or IPv6 address as text (an IPv6 zone id, ``%eth0``, is ignored).
        allow_loopback: Allow 127.0.0.0/8 and ::1 (and IPv6 forms carrying a loopback IPv4 address).
        allow_private: Allow private, link-local, shared, reserved and metadata addresses.
    """
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, IPv6Address):
        if addr in _NAT64_LOCAL:
            return allow_private
        inner = embedded_ipv4(addr)
        if inner is not None:
            inner_allowed = all(_plain_allowed(a, allow_loopback, allow_private) for a in inner)
            if _is_isatap(addr):  # any /64 prefix may carry an ISATAP id (fe80::, fd00::...): judge it too
                return inner_allowed and _plain_allowed(addr, allow_loopback, allow_private)
            return inner_allowed
    return _plain_allowed(addr, allow_loopback, allow_private)


def _ipv4_number(part: str) -> int | None:
    """One part of a numeric IPv4 host as a resolver reads it: ``0x`` hex, leading-zero octal, or decimal."""
    try:
        if part[:2].lower() == "0x":
            return int(part[2:] or "0", 16)
        if len(part) > 1 and part.startswith("0"):
            return int(part[1:], 8)
        return int(part, 10) if part.isdigit() else None
    except ValueError:
        return None


def loose_ipv4(host: str) -> IPv4Address | None:
    """The IPv4 address a numeric host stands for in any form inet_aton accepts (``127.1``, ``0x7f.1``), or None.

    Follows the WHATWG URL standard's IPv4 parser: one to four parts; the last part fills the remaining bytes.
    """
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(parts):
        return None
    numbers = [_ipv4_number(p) for p in parts]
    if any(n is None for n in numbers) or any(n > 255 for n in numbers[:-1]):
        return None
    last_bytes = 5 - len(numbers)
    if numbers[-1] >= 256**last_bytes:
        return None
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n << (8 * (3 - i))
    return IPv4Address(value)


def host_refusal(host: str, allow_loopback: bool, allow_private: bool) -> str | None:
    """Why a URL's host (as ``urlsplit().hostname`` gives it) must not be contacted, before resolving it; or None.

    Only IP literals (in any form) and ``localhost`` names are decided here; other names are judged by the
    addresses they resolve to, at connect time.
    """
    name = host.rstrip(".").lower()  # "127.0.0.1." and "localhost." resolve like their dotless forms
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always loopback
        return None if allow_loopback else f"{host} is a loopback name"
    try:
        addr: IPv4Address | IPv6Address | None = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        addr = loose_ipv4(name)
    if addr is None or address_allowed(str(addr), allow_loopback, allow_private):
        return None
    return f"{host} is a non-public address ({addr})"
