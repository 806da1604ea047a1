"""Endpoints and URIs a user gives: the S3 endpoint, the MLflow tracking URI, the KFP host.

``urllib.parse`` raises ValueError on an unclosed IPv6 bracket (``http://[::1``) and on a port past 65535, only
when ``.hostname`` or ``.port`` is read; ``http.client`` refuses a space or a control character only when a
request is sent, and MLflow takes an unknown scheme for an unreachable server and falls back with warnings.
Here each is one UserError line naming the setting, before anything connects.
"""

from __future__ import annotations

import re
import urllib.parse

from lora_moe_core.errors import UserError

#: Schemes MLflow 3 has stores for (``mlflow.store``), plus SQLAlchemy's ``dialect+driver`` forms of the databases.
MLFLOW_SCHEMES = frozenset({"http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks",
                            "databricks-uc", "uc"})  # fmt: skip
#: Values that switch tracking off (``lora_moe_core.tracking.mlflow_client.DISABLED_URIS``).
TRACKING_OFF = frozenset({"none", "off", "disabled"})
# Up to the last '@': a raw '/' in a password moves the rest of it out of urlsplit's netloc into the path
_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*://)?).*@")


def _shown(url: str) -> str:
    """``url`` without its ``user:password@`` part (whatever the password holds), for a message."""
    return _USERINFO.sub(r"\1", url)


def _odd_character(url: str) -> str | None:
    for index, char in enumerate(url):
        if char.isspace() or not char.isprintable():
            kind = "a space" if char == " " else f"character U+{ord(char):04X}"
            return f"holds {kind} at character {index} (URLs cannot; percent-encode it as %{ord(char):02X})"
    return None


def check_http_url(url: str, what: str, *, allow_path: bool = True) -> urllib.parse.SplitResult:
    """``url`` split, when it is ``http(s)://host[:port][/path]`` with a valid host and port 1-65535.

    Raises:
        UserError: ``<what> 'http://[::1': unclosed '[' of an IPv6 address; ...`` and the like.
    """
    form = "http(s)://host[:port]" + ("[/path]" if allow_path else "")
    shown = _shown(url)
    if problem := _odd_character(url):
        raise UserError(f"{what} {shown!r} {problem}")
    try:
        parts = urllib.parse.urlsplit(url)
        hostname, port = parts.hostname, parts.port
    except ValueError as exc:
        text = str(exc)
        reason = ("unclosed '[' of an IPv6 address" if "IPv6" in text else
                  "port out of range (1-65535)" if "out of range" in text else "the port is not a number")  # fmt: skip
        raise UserError(f"{what} {shown!r}: {reason}; it must look like {form}") from None
    if parts.scheme not in ("http", "https"):
        raise UserError(f"{what} {shown!r} must look like {form} (http:// or https://)")
    if not hostname:
        raise UserError(f"{what} {shown!r} names no host; it must look like {form}")
    if port == 0:
        raise UserError(f"{what} {shown!r}: port 0 is not a port (1-65535)")
    if not allow_path and parts.path not in ("", "/"):
        raise UserError(f"{what} {shown!r} must look like {form}, without a path")
    return parts


def check_tracking_uri(uri: str, what: str = "MLflow tracking URI") -> str:
    """``uri`` when MLflow has a store for it (http(s) checked as by :func:`check_http_url`), a bare path
    (MLflow's file store) or ``none``/``off``/``disabled``.

    Raises:
        UserError: an unknown scheme, a malformed http(s) URL or a control character.
    """
    if uri.strip().lower() in TRACKING_OFF:
        return uri
    if "://" not in uri and ":" not in uri.partition("/")[0]:
        if problem := _odd_character(uri.replace(" ", "")):  # a path may hold spaces, not controls
            raise UserError(f"{what} {uri!r} {problem}")
        return uri
    scheme = uri.partition(":")[0].lower()
    if scheme.partition("+")[0] not in MLFLOW_SCHEMES:
        known = ", ".join(sorted(MLFLOW_SCHEMES))
        raise UserError(f"{what} {_shown(uri)!r} has the unknown scheme {scheme!r} (MLflow reads {known}; "
                        "'none' turns tracking off)")  # fmt: skip
    if scheme in ("http", "https"):
        check_http_url(uri, what)
    elif problem := _odd_character(uri.replace(" ", "")):
        raise UserError(f"{what} {_shown(uri)!r} {problem}")
    return uri
