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
import ipaddress
import socket
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
    each checked first (``allowed_hosts``: the hosts collect.allowed_hosts lists)."""
    import urllib3

    retry = urllib3.Retry(
        total=RETRIES,
        backoff_factor=0.5,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=("GET",),
        raise_on_status=False,
    )
    pool = urllib3.PoolManager(retries=retry, timeout=urllib3.Timeout(connect=30, read=60))
    url = uri
    try:
        for _ in range(MAX_REDIRECTS + 1):
            response = pool.request("GET", url, preload_content=False, redirect=False)
            try:
                location = response.get_redirect_location()  # False: not a redirect
                if location is False:
                    etag, last_modified = _save_response(response, uri, url, dest)
                    break
                response.close()  # a redirect's body is never wanted, and a hostile one may not end
            finally:
                response.release_conn()
            url = _redirect_target(uri, url, location, allowed_hosts)
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


def _redirect_target(source_uri: str, url: str, location: str | None, allowed_hosts: Sequence[str]) -> str:
    """The absolute URL the redirect from ``url`` points to, once it is allowed: the same scheme
    as the source; with ``allowed_hosts``, a listed host; without, the source's own host and port
    or a host whose every address is public. Nothing has connected to it yet."""
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
        return target
    if host_port(target) == host_port(source_uri):
        return target  # back to the host the config names: it reaches nothing the source did not
    _check_public(refused, target, host, port)
    return target


def _check_public(refused: str, target: str, host: str, port: int) -> None:
    """Refuse a redirect to a host any of whose addresses is not public (loopback, link-local,
    private), as a source must not reach the cluster's own services through a redirect."""
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError as exc:
        raise DataError(f"{refused} {target}: cannot resolve {host} ({exc})") from exc
    for text in sorted(addresses):
        address = ipaddress.ip_address(text.split("%")[0])  # an IPv6 zone ('fe80::1%eth0') is no part of it
        if address.version == 6 and address.ipv4_mapped:
            address = address.ipv4_mapped  # ::ffff:127.0.0.1 is loopback, whatever its spelling
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
                f"{refused} {target}: {host} resolves to {address}, a {kind} address; add "
                f"'{host_port(target)}' to collect.allowed_hosts (with the source's host) to allow it"
            )


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
