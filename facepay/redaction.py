"""Secrets never printed: Redis passwords in URLs (settings, logs, error messages)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# scheme://[user]:password@ — the password part, up to the last '@' before the host.
_URL_CREDENTIALS = re.compile(
    r"(?P<head>\b(?:rediss?(?:\+cluster)?|unix|https?|amqps?)://[^:/@\s]*:)(?P<password>[^@\s]+)(?P<at>@)"
)


def redact_url(url: str) -> str:
    """The URL with its password replaced by `***` (the user name stays: it says who connects)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact(url)
    if not parts.password:
        return url
    user = parts.username or ""
    hosts = parts.netloc.rpartition("@")[2]  # as written: one host:port, or a cluster's list of them
    netloc = f"{user}:***@{hosts}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redact(text: str) -> str:
    """Every URL password inside free text (an exception message, a log line) replaced by `***`."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m['head']}***{m['at']}", text)
