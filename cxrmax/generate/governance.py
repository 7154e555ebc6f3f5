"""Data governance: MIMIC-CXR images may only go to model servers the user controls.

PhysioNet's credentialed data use agreement for MIMIC-CXR forbids sharing the data with third parties,
which includes sending images to online model APIs. So base URLs must point at loopback, a private
network (RFC 1918 / unique-local IPv6 / link-local / CGNAT) or a ``.local``/``.localhost``/``.internal``
name, unless the user passes ``--allow-external-endpoint`` (for example a cloud VM under their own
account that is covered by their institution's agreement). A base URL must also be a plain http(s) URL
that the HTTP client reads with the same host as this check (`check_base_url`); 0.0.0.0 and :: are
refused (addresses to listen on, not to connect to).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import unquote, urlsplit

from cxrmax.core.errors import CxrmaxError, InputError

LOCAL_SUFFIXES = (".local", ".localhost", ".internal", ".lan", ".home.arpa")

DUA_MESSAGE = (
    "MIMIC-CXR's PhysioNet data use agreement forbids sharing the data with third parties, including sending "
    "its images to online services. Serve the model yourself (e.g. `vllm serve` on your own machine or "
    "cluster) and point --base-url at it. If this endpoint is a server under your control that your data "
    "use agreement covers, pass --allow-external-endpoint."
)


class ExternalEndpointError(CxrmaxError):
    """A base URL outside loopback/private networks was given without --allow-external-endpoint."""


def _is_private_ip(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    cgnat = ipaddress.ip_network("100.64.0.0/10")
    return (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or (address.version == 4 and address in cgnat)
    ) and not address.is_unspecified


def endpoint_is_local(url: str, resolve: bool = True) -> tuple[bool, str]:
    """Whether ``url`` points at loopback/private/.local, and why (for messages).

    Host names other than localhost and the local suffixes are resolved: they count as local only when
    every address they resolve to is private or loopback (a cluster's internal DNS names pass)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        return False, "no host in the URL"
    if host == "localhost" or host.endswith(LOCAL_SUFFIXES):
        return True, f"{host} is a local name"
    if _is_private_ip(host):
        return True, f"{host} is a loopback/private address"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if address.is_unspecified:
            return False, (
                f"{host} is the unspecified address, where a server listens, not one to connect to; "
                "use 127.0.0.1 for this machine"
            )
        return False, f"{host} is a public address"
    if not resolve:
        return False, f"{host} is not a local name"
    try:
        infos = socket.getaddrinfo(host, parts.port or 80, proto=socket.IPPROTO_TCP)
    except OSError:
        return False, f"{host} does not resolve here, so it cannot be checked to be private"
    addresses = sorted({info[4][0] for info in infos})
    public = [a for a in addresses if not _is_private_ip(a)]
    if public:
        return False, f"{host} resolves to public address {public[0]}"
    return True, f"{host} resolves only to private addresses"


def _normal_host(host: str | None) -> str:
    host = unquote(host or "").lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(host))  # ::ffff:8.8.8.8 and ::ffff:808:808 are one address
    except ValueError:
        return host


def check_base_url(url: str) -> None:
    """InputError unless ``url`` is an http(s) URL with a host and a valid port that the HTTP client
    (aiohttp, through yarl) reads with the same host as this module: a URL the two parse differently
    (``http://8.8.8.8\\@127.0.0.1/v1``) could be judged local here and sent elsewhere."""
    if "://" not in url:
        raise InputError(f"--base-url {url} has no scheme: write http://{url}")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise InputError(f"--base-url {url} must start with http:// or https://")
    if not parts.hostname:
        raise InputError(f"--base-url {url} has no host")
    try:
        port = parts.port
    except ValueError:
        raise InputError(f"--base-url {url} has an invalid port") from None
    if port == 0:
        raise InputError(f"--base-url {url} has an invalid port")
    try:
        import yarl
    except ImportError:  # no aiohttp either: nothing else will parse it
        return
    try:
        client_host = yarl.URL(url).host
    except ValueError as exc:
        raise InputError(f"--base-url {url} is not a valid URL ({exc})") from None
    if _normal_host(client_host) != _normal_host(parts.hostname):
        raise InputError(
            f"--base-url {url} is ambiguous: its host reads as {parts.hostname!r} or {client_host!r}"
        )


def check_endpoints(urls: list[str], allow_external: bool = False) -> None:
    """Raise InputError for a URL that is not a plain http(s) URL, and ExternalEndpointError, explaining
    the data use agreement, for any URL that is not local."""
    for url in urls:
        check_base_url(url)
    for url in urls:
        ok, why = endpoint_is_local(url)
        if not ok and not allow_external:
            raise ExternalEndpointError(f"refusing to send MIMIC-CXR images to {url} ({why}). {DUA_MESSAGE}")
