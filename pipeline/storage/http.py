"""http(s) URLs read to a local file: retries of what may clear by itself, and redirects checked
before anything connects to them.

Transient failures (a refused or dropped connection, a timeout, 429 and 5xx answers) are retried
by urllib3 and then raised as a ``TransientError`` (exit 75, the task is retried); a 4xx, a bad
certificate or a refused redirect is a ``DataError`` (exit 2). Redirects are followed (at most
``MAX_REDIRECTS``) only within the URL's scheme and, unless ``allowed_hosts`` lists the host,
only to public addresses or back to the URL's own host and port.

    python -c "from pathlib import Path; from pipeline.storage import http; print(http.download('https://example.com/', Path('/tmp/x')))"

urllib3 is imported inside the functions that download: DAG parsing never pays for it.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from pipeline.errors import DataError, TransientError

READ_BYTES = 1 << 20  # bytes per read from a response body
# Transient HTTP failures are retried by urllib3's Retry (exponential back-off 0.5 s, 1 s, 2 s),
# as S3 downloads are by botocore's standard mode; a 4xx is the source's answer and is not.
RETRIES = 3
RETRY_STATUSES = (429, 500, 502, 503, 504)
# Redirects are followed here, not by urllib3, so that each target is checked before anything
# connects to it: a public source must not be able to send collect to 169.254.169.254.
MAX_REDIRECTS = 5


@dataclass(frozen=True)
class Download:
    """What a download tells besides the bytes: the URL they came from after redirects, and that
    response's ETag and Last-Modified (ISO 8601; None when absent or unreadable)."""

    final_uri: str
    etag: str | None
    last_modified: str | None


def download(uri: str, dest: Path, allowed_hosts: Sequence[str] = ()) -> Download:
    """Stream the http(s) URL ``uri`` to ``dest`` in chunks; at most ``MAX_REDIRECTS`` redirects,
    each checked first (``allowed_hosts``: the hosts collect.allowed_hosts lists). Each hop resolves
    its host once and connects only to those addresses, retries included: what was checked is what
    is reached, whatever the name answers later."""
    import urllib3

    retry = urllib3.Retry(
        total=RETRIES,
        backoff_factor=0.5,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=("GET",),
        raise_on_status=False,
    )
    timeout = urllib3.Timeout(connect=30, read=60)
    url, addresses = uri, list[str]()  # the source is not checked: resolved on its first connect
    try:
        for _ in range(MAX_REDIRECTS + 1):
            with _pool(url, addresses, retry, timeout) as pool:
                response = pool.request(
                    "GET", urllib3.util.parse_url(url).request_uri, preload_content=False, redirect=False
                )
                try:
                    location = response.get_redirect_location()  # False: not a redirect
                    if location is False:
                        etag, last_modified = _save_response(response, uri, url, dest)
                        break
                    response.close()  # a redirect's body is never wanted, and a hostile one may not end
                finally:
                    response.release_conn()
            url, addresses = _redirect_target(uri, url, location, allowed_hosts)
        else:
            raise DataError(f"cannot download {uri}: more than {MAX_REDIRECTS} redirects (the last to {url})")
    except urllib3.exceptions.HTTPError as exc:  # refused, timed out, body cut short, retries spent
        where = "" if url == uri else f" (redirected to {url})"
        if _transient(exc):
            raise TransientError(
                f"cannot download {uri}{where}: {exc!r} (after {RETRIES} retries); "
                f"it may clear by itself, so the task is retried with back-off"
            ) from exc
        raise DataError(f"cannot download {uri}{where}: {exc!r}") from exc
    return Download(url, etag, last_modified)


def _pool(url: str, addresses: list[str], retry: Any, timeout: Any) -> Any:
    """A urllib3 connection pool for ``url`` whose connections go only to ``addresses`` (the ones
    checked; when empty, the host's addresses resolved on the first connect and kept for the
    retries). The pool keeps the URL's host: the Host header, the TLS SNI and the certificate's
    hostname check are the URL's, not the address's."""
    import urllib3

    pool = urllib3.connection_from_url(url, retries=retry, timeout=timeout, pinned=addresses)
    pool.ConnectionCls = _pinned_connection(pool.ConnectionCls)
    return pool


@functools.cache
def _pinned_connection(base: Any) -> Any:
    """urllib3's connection class ``base`` (HTTP or HTTPS) connecting to its ``pinned`` addresses,
    in order, instead of resolving its host again (a name that rebinds between the redirect check
    and the connect must not reach what the check refused)."""
    import urllib3
    from urllib3.util.connection import create_connection

    errors = urllib3.exceptions

    class Pinned(base):
        def __init__(self, *args: Any, pinned: list[str], **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.pinned = pinned  # shared by the pool's connections: one resolution per hop

        def _new_conn(self) -> socket.socket:  # as urllib3's, with the addresses fixed
            try:
                if not self.pinned:
                    self.pinned.extend(_resolve(self.host.strip("[]"), self.port))
                error: OSError = OSError(f"{self.host} resolves to no address")
                for address in self.pinned:
                    try:
                        sock = create_connection(
                            (address, self.port),
                            self.timeout,
                            source_address=self.source_address,
                            socket_options=self.socket_options,
                        )
                        break
                    except OSError as exc:
                        error = exc
                else:
                    raise error
            except socket.gaierror as exc:
                raise errors.NameResolutionError(self.host, self, exc) from exc
            except TimeoutError as exc:
                raise errors.ConnectTimeoutError(
                    self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})"
                ) from exc
            except OSError as exc:
                raise errors.NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc
            sys.audit("http.client.connect", self, self.host, self.port)
            return sock

    return Pinned


def _resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to, in the resolver's order, each once."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _transient(exc: Exception) -> bool:
    """Whether urllib3's failure may clear by itself: a refused, reset or dropped connection, a
    timeout, a body cut short. A bad certificate or URL is a verdict."""
    import urllib3

    errors = urllib3.exceptions
    reason = exc.reason if isinstance(exc, errors.MaxRetryError) and exc.reason is not None else exc
    if isinstance(reason, (errors.SSLError, errors.LocationValueError, errors.ProxySchemeUnknown)):
        return False
    return isinstance(
        reason,
        (
            errors.TimeoutError,
            errors.NewConnectionError,
            errors.ProtocolError,
            errors.ResponseError,
            errors.IncompleteRead,
            errors.DecodeError,
            ConnectionError,
        ),
    )


def _save_response(response: Any, uri: str, url: str, dest: Path) -> tuple[str | None, str | None]:
    """Write the body of the final (not a redirect) response for ``uri`` to ``dest``; its ETag
    and Last-Modified."""
    if response.status >= 400:
        retried = f" (after {RETRIES} retries)" if response.status in RETRY_STATUSES else ""
        where = "" if url == uri else f" (redirected to {url})"
        message = f"cannot download {uri}{where}: HTTP Error {response.status}: {response.reason}{retried}"
        if response.status in RETRY_STATUSES or response.status >= 500:  # busy or failing: not the source's answer
            raise TransientError(f"{message}; it may clear by itself, so the task is retried with back-off")
        raise DataError(message)
    with dest.open("wb") as out:
        for chunk in response.stream(READ_BYTES):
            out.write(chunk)
    headers = response.headers
    last_modified = None
    if headers.get("Last-Modified"):
        with contextlib.suppress(TypeError, ValueError):
            last_modified = parsedate_to_datetime(headers["Last-Modified"]).isoformat()
    return headers.get("ETag"), last_modified


def _redirect_target(
    source_uri: str, url: str, location: str | None, allowed_hosts: Sequence[str]
) -> tuple[str, list[str]]:
    """The absolute URL the redirect from ``url`` points to, once it is allowed: the same scheme
    as the source; with ``allowed_hosts``, a listed host; without, the source's own host and port
    or a host whose every address is public. With it, the addresses checked (the connection goes
    to those only), or none when nothing was resolved. Nothing has connected to it yet."""
    refused = f"cannot download {source_uri}: refused the redirect from {url} to"
    if not location:
        raise DataError(f"cannot download {source_uri}: {url} answered a redirect without a Location")
    target = urljoin(url, location)
    parts = urlsplit(target)
    if parts.scheme != urlsplit(source_uri).scheme:
        raise DataError(
            f"{refused} {target}: it changes the scheme from {urlsplit(source_uri).scheme} to "
            f"{parts.scheme or 'none'}, which no setting allows (name that URL in collect.sources "
            "if it is the one meant)"
        )
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port that is no number
        host = None
    if not host:
        raise DataError(f"{refused} {target}: not a URL with a host")
    if allowed_hosts:
        if not listed(target, allowed_hosts):
            raise DataError(
                f"{refused} {target}: {host_port(target)} is not in collect.allowed_hosts "
                f"{list(allowed_hosts)}; add it there to allow it"
            )
        return target, []
    if host_port(target) == host_port(source_uri):
        return target, []  # back to the host the config names: it reaches nothing the source did not
    return target, _check_public(refused, target, host, port)


def _check_public(refused: str, target: str, host: str, port: int) -> list[str]:
    """The addresses of ``host``, once every one is public; refuse a redirect to a host any of
    whose addresses is not (loopback, link-local, private), as a source must not reach the
    cluster's own services through a redirect. An IPv6 address that carries an IPv4 one (mapped,
    compatible, 6to4, NAT64) is judged by the IPv4 address it reaches."""
    try:
        addresses = _resolve(host, port)
    except OSError as exc:
        raise DataError(f"{refused} {target}: cannot resolve {host} ({exc})") from exc
    for text in sorted(addresses):
        address: ipaddress.IPv4Address | ipaddress.IPv6Address
        address = ipaddress.ip_address(text.split("%")[0])  # an IPv6 zone ('fe80::1%eth0') is no part of it
        shown = str(address)
        if address.version == 6 and (embedded := _embedded_ipv4(address)):
            address, shown = embedded, f"{address}, which reaches {embedded}"
        if not address.is_global:
            kind = (
                "loopback"
                if address.is_loopback
                else "link-local"
                if address.is_link_local
                else "private"
                if address.is_private
                else "non-public"
            )
            raise DataError(
                f"{refused} {target}: {host} resolves to {shown}, a {kind} address; add "
                f"'{host_port(target)}' to collect.allowed_hosts (with the source's host) to allow it"
            )
    return addresses


# IPv6 prefixes whose last 32 bits are an IPv4 address a translator reaches: the well-known NAT64
# prefix and the local-use one (RFC 6052, RFC 8215; the /96 layout, as DNS64 writes it).
NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address ``address`` reaches, if it is one of the forms that carry one: IPv4-mapped
    (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d, not :: or ::1), 6to4 (2002:aabb:ccdd::/48), NAT64."""
    value = int(address)
    if address.ipv4_mapped or address.sixtofour:
        return address.ipv4_mapped or address.sixtofour
    if any(address in prefix for prefix in NAT64) or (value >> 32 == 0 and value > 1):
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return None


def host_port(url: str) -> str:
    """'host:port' of ``url`` as collect.allowed_hosts writes it (IPv6 in brackets, default port filled in)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = 0
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listed(url: str, allowed_hosts: Sequence[str]) -> bool:
    """Whether ``allowed_hosts`` (collect.allowed_hosts) names the host of ``url``: alone (any port) or with its port."""
    address = host_port(url)
    host = address.rpartition(":")[0]
    return any(entry.lower() in (address, host, host.strip("[]")) for entry in allowed_hosts)
