"""Start runs and schedules on a KFP cluster through the SDK (``kfp.Client``).

Connection settings come from flags or the environment: ``KFP_HOST`` (or the SDK's ``KF_PIPELINES_ENDPOINT``),
``KFP_NAMESPACE``, and one of ``KFP_TOKEN`` (bearer token), ``KF_PIPELINES_SA_TOKEN_PATH`` (in-cluster projected
service-account token) or ``KFP_COOKIES`` (``name=value; …`` session cookies of a Dex/OIDC login). The host is
probed first with one short HTTP request: ``kfp.Client`` itself retries its health check for ~25 s.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_moe_core.errors import UserError
from lora_moe_core.guards.parse import json_or_text
from lora_moe_core.guards.urls import check_http_url

PROBE_TIMEOUT_S = 5.0
HEALTHZ = "/apis/v2beta1/healthz"


@dataclass(frozen=True)
class Connection:
    """Where the KFP API is and how to authenticate (secrets never appear in ``repr``)."""

    host: str
    namespace: str | None = None
    token: str | None = None
    cookies: str | None = None
    sa_token_path: str | None = None

    def __repr__(self) -> str:
        auth = "token" if self.token else "cookies" if self.cookies else "sa-token" if self.sa_token_path else "none"
        return f"Connection(host={self.host!r}, namespace={self.namespace!r}, auth={auth})"

    @classmethod
    def from_env(cls, host: str | None = None, namespace: str | None = None) -> Connection:
        host = host or os.environ.get("KFP_HOST") or os.environ.get("KF_PIPELINES_ENDPOINT")
        if not host:
            raise UserError(
                "no KFP host: pass --host or set KFP_HOST (e.g. http://localhost:8080 after "
                "`kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`)"
            )
        if "@" in host:  # it would be printed with every run URL; the message shows only what follows the '@'
            raise UserError(
                "KFP host holds credentials (user:password@): set KFP_TOKEN or KFP_COOKIES and give only the "
                f"address after the '@' ({host.rpartition('@')[2]})"
            )
        check_http_url(host, "KFP host")  # an unclosed '[', a bad port, a space in the path: one line here
        sa_path = os.environ.get("KF_PIPELINES_SA_TOKEN_PATH")
        for name in ("KFP_TOKEN", "KFP_COOKIES"):
            _check_header_value(os.environ.get(name) or "", name)
        return cls(
            host=host.rstrip("/"),
            namespace=namespace or os.environ.get("KFP_NAMESPACE") or None,
            token=os.environ.get("KFP_TOKEN") or None,
            cookies=os.environ.get("KFP_COOKIES") or None,
            sa_token_path=sa_path if sa_path and Path(sa_path).is_file() else None,
        )

    def headers(self) -> dict[str, str]:
        headers = {}
        token = self.token
        if not token and self.sa_token_path:
            token = _check_header_value(_read_token_file(self.sa_token_path), f"the token file {self.sa_token_path}")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if self.cookies:
            headers["Cookie"] = self.cookies
        return headers


def _check_header_value(value: str, where: str) -> str:
    """``value`` when it can travel as an HTTP header; else a UserError naming ``where``, never the value (a line
    break would split the header, and http.client's refusal would print the credential in a traceback)."""
    bad = next((index for index, char in enumerate(value) if not (char.isprintable() and char.isascii())), None)
    if bad is not None:
        raise UserError(f"{where} holds a line break or another character a header cannot carry (character "
                        f"{bad + 1} of {len(value)}); set it to the credential alone")  # fmt: skip
    return value


def _read_token_file(path: str) -> str:
    from lora_moe_core.guards.files import read_regular_bytes

    try:
        return read_regular_bytes(path, "service-account token file").decode("ascii").strip()
    except UnicodeDecodeError:
        raise UserError(f"the token file {path} is not ASCII text: not a service-account token") from None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 - a login redirect is an answer
        return None


def probe(connection: Connection, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """One GET of the health endpoint; UserError (one line, within ``timeout_s``) when KFP cannot be used."""
    url = connection.host + HEALTHZ
    request = urllib.request.Request(url, headers=connection.headers())
    opener = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))  # kfp.Client uses no env proxy
    try:
        with opener.open(request, timeout=timeout_s) as response:
            if response.status == 200:
                return
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"cannot reach KFP at {connection.host}: {reason} (check --host/KFP_HOST, the port-forward or the VPN)"
        ) from None
    if status in (301, 302, 303, 307, 308):
        raise UserError(
            f"KFP at {connection.host} redirects to a login page: set KFP_COOKIES (session cookies) or KFP_TOKEN"
        )
    if status in (401, 403):
        raise UserError(
            f"KFP at {connection.host} refused the credentials (HTTP {status}): set KFP_TOKEN, "
            "KF_PIPELINES_SA_TOKEN_PATH or KFP_COOKIES"
        )
    if status == 404:
        raise UserError(
            f"{connection.host} answers but has no KFP API at {HEALTHZ} (HTTP 404): is the path right, "
            "e.g. http://<gateway>/pipeline?"
        )
    raise UserError(f"KFP at {connection.host} is not healthy (HTTP {status} on {HEALTHZ})")


def client(connection: Connection):
    """A ``kfp.Client`` for ``connection``, after a short reachability probe."""
    import kfp

    probe(connection)
    kwargs: dict[str, Any] = {"host": connection.host}
    if connection.namespace:
        kwargs["namespace"] = connection.namespace
    if connection.token:
        kwargs["existing_token"] = connection.token
    elif connection.sa_token_path:
        from kfp.client import ServiceAccountTokenVolumeCredentials

        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(path=connection.sa_token_path)
    if connection.cookies:
        kwargs["cookies"] = connection.cookies
    return _call("connect", lambda: kfp.Client(**kwargs))


def _call(what: str, function):
    """Run one SDK call; API errors become one ``UserError`` line with the server's message."""
    from kfp_server_api.exceptions import ApiException

    try:
        return function()
    except ApiException as exc:
        message = exc.reason or ""
        try:
            message = json.loads(exc.body or "{}").get("message") or message
        except (ValueError, AttributeError):
            pass
        raise UserError(f"KFP {what} failed: HTTP {exc.status} {' '.join(str(message).split())[:300]}") from None
    except TimeoutError as exc:
        raise UserError(f"KFP {what} failed: {exc}") from None


# -- parameters -------------------------------------------------------------------------------------------------
def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` strings → arguments; values are JSON when they parse (numbers, lists, true) else strings."""
    arguments: dict[str, Any] = {}
    for item in items or []:
        key, has_value, value = item.partition("=")
        if not has_value or not key:
            raise UserError(f"--param {item!r} must be name=value")
        arguments[key] = json_or_text(value, f"--param {key}")  # depth and digits bounded: no traceback
    return arguments


def check_arguments(package: str | Path, arguments: dict[str, Any]) -> None:
    """UserError when an argument is not a parameter of the compiled pipeline."""
    from pipelines.compile import load_ir

    spec, _ = load_ir(package)
    known = set(spec.root.input_definitions.parameters)
    unknown = sorted(set(arguments) - known)
    if unknown:
        raise UserError(
            f"{', '.join(unknown)}: not a parameter of {spec.pipeline_info.name} "
            f"(parameters: {', '.join(sorted(known))})"
        )


# -- cron -------------------------------------------------------------------------------------------------------
_CRON_FIELDS = (
    ("second", 0, 59, {}),
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    (
        "month",
        1,
        12,
        {
            m: i + 1
            for i, m in enumerate(("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"))
        },
    ),
    ("day of week", 0, 6, {d: i for i, d in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))}),
)
_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_EVERY = re.compile(r"^@every (\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def validate_cron(expression: str) -> str:
    """Check a KFP (robfig/cron) schedule: 6 fields ``second minute hour day-of-month month day-of-week``
    (``*``, ``?``, lists, ranges, ``/`` steps, JAN-DEC, SUN-SAT) or ``@daily``-style descriptors / ``@every 1h``.

    Returns the expression (whitespace normalised); raises UserError naming the bad field.
    """
    text = " ".join(expression.split())
    if text.startswith("@"):
        if text in _DESCRIPTORS or _EVERY.match(text):
            return text
        raise UserError(f"cron {expression!r}: unknown descriptor (use {', '.join(_DESCRIPTORS)} or '@every 1h30m')")
    fields = text.split(" ")
    if len(fields) != 6:
        raise UserError(
            f"cron {expression!r} has {len(fields)} fields; KFP needs 6: second minute hour day-of-month "
            "month day-of-week, e.g. '0 0 3 * * *' (03:00 every day)"
        )
    for value, (name, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
        for part in value.split(","):
            if not _cron_part_ok(part, low, high, names, wildcard_q=name.startswith("day")):
                raise UserError(
                    f"cron {expression!r}: bad {name} field {value!r} (allowed {low}-{high}, *, lists, ranges, steps)"
                )
    return text


def _ascii_digits(text: str) -> bool:
    """0-9 only, at most 4 of them: str.isdigit() is also true of '²' (int() refuses it) and of other scripts'
    digits that KFP's Go cron parser does not read."""
    return text.isascii() and text.isdigit() and len(text) <= 4


def _cron_part_ok(part: str, low: int, high: int, names: dict[str, int], wildcard_q: bool) -> bool:
    base, has_step, step = part.partition("/")
    if has_step and (not _ascii_digits(step) or int(step) == 0):
        return False
    if base == "*" or (wildcard_q and base == "?"):
        return True
    start, has_range, end = base.partition("-")
    values = [start, end] if has_range else [start]

    def number(text: str) -> int | None:
        if text.upper() in names:
            return names[text.upper()]
        return int(text) if _ascii_digits(text) else None

    numbers = [number(v) for v in values]
    if any(n is None or not low <= n <= high for n in numbers):
        return False
    return not has_range or numbers[0] <= numbers[1]


# -- runs and schedules ----------------------------------------------------------------------------------------
def _upload_version(kfp_client, package: Path, pipeline_name: str, version: str) -> tuple[str, str]:
    """Upload ``package`` as ``version`` of ``pipeline_name`` (the pipeline is created on first use)."""
    pipeline_id = _call("get pipeline", lambda: kfp_client.get_pipeline_id(pipeline_name))
    if pipeline_id is None:
        created = _call(
            "upload pipeline", lambda: kfp_client.upload_pipeline(str(package), pipeline_name=pipeline_name)
        )
        pipeline_id = created.pipeline_id
    uploaded = _call(
        "upload pipeline version",
        lambda: kfp_client.upload_pipeline_version(
            str(package), pipeline_version_name=version, pipeline_id=pipeline_id
        ),
    )
    return pipeline_id, uploaded.pipeline_version_id


def submit_run(
    connection: Connection,
    package: str | Path,
    arguments: dict[str, Any],
    experiment: str,
    run_name: str | None = None,
    pipeline_name: str | None = None,
    version: str | None = None,
    enable_caching: bool = False,
) -> dict[str, str]:
    """Start one run of ``package``; with ``version``, upload it first as that version of ``pipeline_name``.

    Returns ``{"run_id", "run_url", "pipeline_id"?, "version_id"?}``.
    """
    package = Path(package)
    check_arguments(package, arguments)
    kfp_client = client(connection)
    run_name = run_name or f"lora-moe-{time.strftime('%Y%m%d-%H%M%S')}"
    result: dict[str, str] = {}
    if version:
        pipeline_id, version_id = _upload_version(kfp_client, package, pipeline_name or _name(package), version)
        experiment_id = _experiment_id(kfp_client, experiment, connection)
        run = _call(
            "create run",
            lambda: kfp_client.run_pipeline(
                experiment_id=experiment_id,
                job_name=run_name,
                params=arguments,
                pipeline_id=pipeline_id,
                version_id=version_id,
                enable_caching=enable_caching,
            ),
        )
        result.update(pipeline_id=pipeline_id, version_id=version_id, run_id=run.run_id)
    else:
        run = _call(
            "create run",
            lambda: kfp_client.create_run_from_pipeline_package(
                str(package),
                arguments=arguments,
                run_name=run_name,
                experiment_name=experiment,
                namespace=connection.namespace,
                enable_caching=enable_caching,
            ),
        )
        result["run_id"] = run.run_id
    result["run_url"] = f"{connection.host}/#/runs/details/{result['run_id']}"
    return result


def _experiment_id(kfp_client: Any, experiment: str, connection: Connection) -> str:
    """The id of ``experiment`` in the connection's namespace (KFP creates it or returns the existing one)."""
    return _call(
        "create experiment",
        lambda: kfp_client.create_experiment(experiment, namespace=connection.namespace).experiment_id,
    )


def schedule_run(
    connection: Connection,
    package: str | Path,
    cron: str,
    job_name: str,
    experiment: str,
    arguments: dict[str, Any],
    pipeline_name: str | None = None,
    version: str | None = None,
    max_concurrency: int = 1,
    enabled: bool = True,
) -> dict[str, str]:
    """Create a recurring run (KFP's 6-field cron, seconds first); with ``version``, from an uploaded version.

    Returns ``{"recurring_run_id", "experiment_id", "pipeline_id"?, "version_id"?}``.
    """
    package = Path(package)
    cron = validate_cron(cron)
    if max_concurrency < 1:
        raise UserError("--max_concurrency must be >= 1")
    check_arguments(package, arguments)
    kfp_client = client(connection)
    experiment_id = _experiment_id(kfp_client, experiment, connection)
    source: dict[str, Any] = {"pipeline_package_path": str(package)}
    result: dict[str, str] = {"experiment_id": experiment_id}
    if version:
        pipeline_id, version_id = _upload_version(kfp_client, package, pipeline_name or _name(package), version)
        source = {"pipeline_id": pipeline_id, "version_id": version_id}
        result.update(pipeline_id=pipeline_id, version_id=version_id)
    recurring = _call(
        "create recurring run",
        lambda: kfp_client.create_recurring_run(
            experiment_id=experiment_id,
            job_name=job_name,
            cron_expression=cron,
            max_concurrency=max_concurrency,
            params=arguments,
            enabled=enabled,
            enable_caching=False,
            **source,
        ),
    )
    result["recurring_run_id"] = recurring.recurring_run_id
    return result


def _name(package: Path) -> str:
    from pipelines.compile import load_ir

    return load_ir(package)[0].pipeline_info.name
