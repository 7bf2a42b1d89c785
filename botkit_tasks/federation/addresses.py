"""Which IP addresses federation traffic may go to: public unicast ones only.

Remote servers choose the URLs we fetch and post to, so an address is judged
by what it reaches, not by how it is written:

- IPv6 forms that carry an IPv4 address are judged by that IPv4 address:
  IPv4-mapped (``::ffff:10.0.0.1``), NAT64 with the well-known prefix
  (``64:ff9b::/96``, RFC 6052) and 6to4 (``2002::/16``, RFC 3056).  A DNS64
  resolver hands out NAT64 addresses for every IPv4-only server, so a NAT64
  address of a public server is accepted.
- Forms whose target cannot be told from the address are refused whole:
  the local-use NAT64 prefix ``64:ff9b:1::/48`` (RFC 8215; the translator's
  own prefix length decides where the IPv4 address sits), Teredo
  (``2001::/32``, a tunnel to whatever client the relay serves) and the
  deprecated IPv4-compatible (``::a.b.c.d``) and IPv4-translated
  (``::ffff:0:a.b.c.d``) forms.
- Only global unicast IPv6 (``2000::/3``) is public; site-local
  ``fec0::/10`` and documentation ``3fff::/20`` are refused although the
  standard library of older Pythons calls them global.
- A host name that a URL parser or ``getaddrinfo`` reads as an IPv4 number in
  another spelling (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``) is
  refused, named with the address it stands for: resolvers disagree about
  such spellings (octal in one, decimal in another), and no ActivityPub server
  is named that way.
"""

from __future__ import annotations

import ipaddress
import unicodedata

from ..errors import BotkitError

__all__ = ["UnsafeDestinationError", "check_address", "check_host_spelling"]


class UnsafeDestinationError(BotkitError):
    """A URL is refused: not https, or its host resolves to a non-public address."""


_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
# Not public, but inside 2000::/3 and unknown to the standard library of the
# Pythons we support (is_global is True for them there).
_NOT_PUBLIC_V6 = (
    ipaddress.IPv6Network("3fff::/20"),  # documentation, RFC 9637
)


def _refuse(ip: object, why: str = "") -> UnsafeDestinationError:
    return UnsafeDestinationError(f"{ip} is not a public address{why}")


def _check_ipv4(ip: ipaddress.IPv4Address, written: object = None) -> None:
    why = f" (it wraps {ip})" if written is not None else ""
    if (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        # is_global also excludes 100.64.0.0/10 and other special-purpose ranges.
        or not ip.is_global
    ):
        raise _refuse(written or ip, why)


def _embedded(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)


def _check_ipv6(ip: ipaddress.IPv6Address) -> None:
    if ip.ipv4_mapped is not None:
        _check_ipv4(ip.ipv4_mapped, ip)
        return
    if ip in _NAT64_WELL_KNOWN:
        _check_ipv4(_embedded(ip), ip)
        return
    if ip.sixtofour is not None:
        _check_ipv4(ip.sixtofour, ip)
        return
    if ip in _NAT64_LOCAL_USE:
        raise _refuse(ip, f" (local-use NAT64 prefix {_NAT64_LOCAL_USE})")
    if ip.teredo is not None:
        server, client = ip.teredo
        raise _refuse(ip, f" (Teredo tunnel to {client} via {server})")
    if ip in _IPV4_TRANSLATED or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        raise _refuse(ip, f" (deprecated IPv4-embedding form of {_embedded(ip)})")
    if ip not in _GLOBAL_UNICAST:
        where = "site-local fec0::/10" if ip.is_site_local else "outside 2000::/3"
        raise _refuse(ip, f" ({where})")
    for network in _NOT_PUBLIC_V6:
        if ip in network:
            raise _refuse(ip, f" ({network})")
    if ip.is_private or ip.is_reserved or ip.is_multicast or not ip.is_global:
        raise _refuse(ip)


def check_address(address: str) -> None:
    """Refuse an IP address that is not a public unicast address.

    Private, loopback, link-local, multicast, reserved, unspecified, shared
    (CGNAT) and documentation ranges are refused; IPv6 forms that carry an
    IPv4 address are judged by it (see the module docstring).

    Raises:
        UnsafeDestinationError: The address is not public (or not an address);
            the message names the address a wrapping form stands for.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError as exc:
        raise UnsafeDestinationError(f"{address!r} is not an IP address") from exc
    if isinstance(ip, ipaddress.IPv6Address):
        _check_ipv6(ip)
    else:
        _check_ipv4(ip)


def _ipv4_number(part: str) -> int | None:
    """One dotted part as the WHATWG URL standard and ``inet_aton`` read it."""
    if part[:2].lower() == "0x":
        digits, base = part[2:], 16
    elif len(part) > 1 and part.startswith("0"):
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    if digits == "":
        return 0  # "0x" alone is zero
    try:
        return int(digits, base) if digits.isascii() and digits.isalnum() else None
    except ValueError:
        return None


def _numeric_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a host name spells as numbers, else ``None`` (a real name)."""
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # a trailing dot
    # As in the WHATWG URL standard: a host whose last label is a number is an
    # IPv4 address (or invalid), whatever its other labels are.
    if not parts or _ipv4_number(parts[-1]) is None or len(parts) > 4:
        return None
    numbers = [_ipv4_number(part) if part else None for part in parts]
    if any(n is None for n in numbers):
        return None
    *head, last = [n for n in numbers if n is not None]
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(parts)):
        return None
    value = last
    for position, number in enumerate(head):
        value += number << (8 * (3 - position))
    return ipaddress.IPv4Address(value)


def check_host_spelling(host: str) -> None:
    """Refuse a host name that spells an IPv4 address any way but dotted-decimal.

    ``2130706433``, ``0x7f.1``, ``0177.0.0.1`` and ``127.1`` all mean
    127.0.0.1 to ``getaddrinfo``; full-width digits and ideographic dots are
    folded first, as IDNA does.  Canonical literals and ordinary names pass.

    Raises:
        UnsafeDestinationError: The host is such a spelling; the message names
            the address and whether it is public.
    """
    folded = unicodedata.normalize("NFKC", host).replace("\u3002", ".").lower()
    if ":" in folded:
        return  # an IPv6 literal, judged by check_address
    ip = _numeric_ipv4(folded)
    if ip is None or str(ip) == host:
        return
    try:
        _check_ipv4(ip)
    except UnsafeDestinationError:
        raise _refuse(ip, f" (the host {host!r} spells {ip})") from None
    raise UnsafeDestinationError(
        f"refusing the host {host!r}: it spells the IPv4 address {ip}; write it as {ip}"
    )
