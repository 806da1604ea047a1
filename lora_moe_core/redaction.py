"""Keep credentials out of everything we print, log, raise or send to MLflow.

Credentials reach the code only through the environment (``kfp.kubernetes.use_secret_as_env`` on the cluster,
the shell locally). :data:`SECRET_ENV_VARS` names the variables whose *values* are secret; :func:`redact`
replaces those values (also percent-encoded, as they appear inside URLs) and the password part of
``scheme://user:password@host`` with ``***`` in any text. :func:`redact_mapping` does the same for MLflow
params/tags and other nested data, and also masks values whose *key* names a credential (``db_password``).

Access key ids (``AWS_ACCESS_KEY_ID``) are identifiers, not secrets (S3 servers log them): they are left alone,
so that short ids such as ``admin`` do not blank out every log line that contains the word.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

MASK = "***"
# Environment variables whose values are secret: S3 (lora_moe_core.storage.s3_backend), MLflow's HTTP auth (read by the
# MLflow client), the KFP API (pipelines/submit.py) and MinIO's own root password (manifests/).
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MINIO_SECRET_KEY",
    "MINIO_ROOT_PASSWORD",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "KFP_TOKEN",
    "KFP_COOKIES",
)
# Values shorter than this are not searched for: replacing every "abc" would wreck the text and hide nothing
# (MinIO refuses secret keys under 8 characters).
MIN_SECRET_LENGTH = 6
# scheme://userinfo@ where userinfo runs to the last '@' before the path (a raw '@' in a password is common).
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/?#@]*(?:@[^\s/?#@]*)*)@")
# A key whose last part names a credential: password, db_password, aws_secret_access_key, api-key, session_token.
# A bare "token" only as a whole part: pad_token and max_tokens are model settings, not credentials.
_SECRET_KEY_NAME = re.compile(
    r"(^|[._-])(password|passwd|secret|secret[_-]?(access[_-]?)?key|api[_-]?key|private[_-]?key|credentials?|"
    r"cookies?|(access|auth|api|bearer|session|refresh|tracking|kfp|hf)[_-]?token)$|(^|\.)token$",
    re.IGNORECASE,
)


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """The values of :data:`SECRET_ENV_VARS` set in ``env`` (default ``os.environ``), longest first."""
    env = os.environ if env is None else env
    values = {env.get(name, "") for name in SECRET_ENV_VARS}
    return sorted((v for v in values if len(v) >= MIN_SECRET_LENGTH), key=len, reverse=True)


def is_secret_name(name: str) -> bool:
    """True when ``name`` (a variable, parameter or config key) names a credential."""
    return bool(_SECRET_KEY_NAME.search(name.strip()))


def _mask_userinfo(match: re.Match) -> str:
    user, has_password, _ = match.group("userinfo").partition(":")
    # user:password@ keeps the user (useful when debugging); a lone user part may be a token (https://TOKEN@host)
    return f"{match.group('scheme')}{user}:{MASK}@" if has_password else f"{match.group('scheme')}{MASK}@"


def redact_url(url: str) -> str:
    """``http://user:password@host/x`` → ``http://user:***@host/x``; URLs without credentials are unchanged."""
    return _URL_USERINFO.sub(_mask_userinfo, url)


def _forms(value: str) -> set[str]:
    """The ways a secret shows in text: as it is, percent-encoded (URLs), escaped as ``repr``/JSON/bytes reprs
    write it (a token holding a line break shows as ``\\n`` in an exception's message) and with its white space
    collapsed (one-line messages join lines)."""
    forms = {value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value), " ".join(value.split())}
    forms |= {repr(value)[1:-1], json.dumps(value)[1:-1], repr(value.encode("utf-8", "replace"))[2:-1]}
    return {form for form in forms if len(form) >= MIN_SECRET_LENGTH}


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """``text`` with secret environment values (in each of their :func:`_forms`) and URL passwords replaced by
    ``***``."""
    text = str(text)
    for value in secret_values(env):
        for form in sorted(_forms(value), key=len, reverse=True):
            text = text.replace(form, MASK)
    return redact_url(text)


def redact_mapping(values: Mapping[str, Any], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A copy of ``values`` (nested dicts/lists too) with strings redacted and credential-named keys masked."""
    return {
        key: MASK if is_secret_name(str(key)) and value else _redact_any(value, env) for key, value in values.items()
    }


def _redact_any(value: Any, env: Mapping[str, str] | None) -> Any:
    if isinstance(value, str):
        return redact(value, env)
    if isinstance(value, Mapping):
        return redact_mapping(value, env)
    if isinstance(value, list | tuple):
        return [_redact_any(item, env) for item in value]
    return value
