"""Object-store URIs (``s3://`` and S3-compatible servers: MinIO, Ceph, moto ...): the standard AWS
variables that configure them, how those reach Ray's workers, and the preflight that fails a job
in seconds, before any work, when a location cannot be used.

Configuration is the AWS SDK's own: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for a server
that is not AWS, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``. ``pyarrow.fs.FileSystem.from_uri`` (what
must-ray, Ray Data and Ray Train open every URI with) reads them; the ``S3FileSystem``
constructor does not read the endpoint variables, so nothing here builds one from scratch.

Ray's worker processes get the environment of whoever started the cluster, not the driver's: a
job connecting to a running cluster forwards the variables it has (:func:`worker_env_vars`, used
by ``must_ray.cli.init_ray``) in its runtime environment.

The preflight (:func:`check_object_store_locations`, run by ``must_ray.cli.load_job_config``)
asks for each bucket once, with short timeouts and one retry: an endpoint that does not answer,
a bucket that does not exist and credentials the server refuses each become one
:class:`~must_ray.typed_config.ConfigError` line naming the key, the URI and the cause."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from must_ray.storage import submitted_runtime_env, uri_scheme
from must_ray.typed_config import ConfigError

#: URI schemes the preflight checks (what ``pyarrow.fs.FileSystem.from_uri`` opens as S3)
S3_SCHEMES = frozenset({"s3"})
#: the standard AWS variables a job forwards to Ray's workers
AWS_ENV_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")
#: the preflight's budget per bucket: connect / request timeouts (seconds) and attempts
PREFLIGHT_CONNECT_TIMEOUT_S = 3.0
PREFLIGHT_REQUEST_TIMEOUT_S = 6.0
PREFLIGHT_ATTEMPTS = 2

_AWS_ERROR = re.compile(r"AWS Error (\w+)(?: \(HTTP status (\d+)\))?")
_CURL = re.compile(r"curlCode: (\d+), ([^;]+)")
_CREDENTIAL_ERRORS = {"ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "INVALID_CLIENT_TOKEN_ID",
                      "EXPIRED_TOKEN", "UNRECOGNIZED_CLIENT", "MISSING_AUTHENTICATION_TOKEN"}


def is_object_store_uri(location: Any) -> bool:
    """True for the locations the preflight checks (``s3://bucket/...``)."""
    return isinstance(location, str) and uri_scheme(location) in S3_SCHEMES


def worker_env_vars(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The AWS variables of this process that Ray's workers need to open the same URIs, for the
    job's ``runtime_env``; without those a submitted job's own runtime env already sets (Ray
    refuses to merge two values of one variable)."""
    environ = os.environ if environ is None else environ
    submitted = _submitted_env_vars(environ)
    return {name: environ[name] for name in AWS_ENV_VARS if environ.get(name) and name not in submitted}


def _submitted_env_vars(environ: Mapping[str, str]) -> set[str]:
    env_vars = submitted_runtime_env(dict(environ)).get("env_vars")
    return set(env_vars) if isinstance(env_vars, dict) else set()


def check_object_store_locations(locations: Sequence[tuple[str, Any]]) -> None:
    """Fail fast (:class:`ConfigError`) when an ``s3://`` location among ``(key or flag,
    location)`` pairs cannot be used: its endpoint does not answer, its bucket does not exist, or
    the server refuses the credentials. Each bucket is asked once; other locations pass."""
    seen: set[str] = set()
    for key, location in locations:
        values = location if isinstance(location, (list, tuple)) else [location]
        for value in values:
            if is_object_store_uri(value) and bucket_uri(value) not in seen:
                seen.add(bucket_uri(value))
                check_bucket(key, value)


def bucket_uri(uri: str) -> str:
    """``s3://bucket`` of ``uri``, with its query options (endpoint, region ...) when it has any;
    the rest of the path is not parsed (a glob such as ``s3://b/img[0-9].png`` is no URI to pyarrow)."""
    scheme, rest = uri.split("://", 1)
    bucket = rest.split("/", 1)[0].split("?", 1)[0]
    query = uri.split("?", 1)[1] if "?" in uri else ""
    return f"{scheme}://{bucket}" + (f"?{query}" if query else "")


def check_bucket(key: str, uri: str) -> None:
    """Raise :class:`ConfigError` (one line: ``key``, ``uri``, the cause, what to do) unless the
    bucket of ``uri`` answers a metadata request within the preflight's timeouts."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    where = f"{key}={uri}"
    probe = bucket_uri(uri)
    bucket = probe.split("://", 1)[1].split("?", 1)[0]
    try:
        fs, _ = pafs.FileSystem.from_uri(probe)
    except (pa.ArrowInvalid, ValueError) as exc:
        raise ConfigError(f"{where}: not a URI pyarrow can open ({_one_line(exc)})") from None
    except OSError as exc:  # resolving the bucket's region already asked the server
        raise ConfigError(_explain(where, bucket, "AWS S3", exc)) from None
    options = _options(fs)
    endpoint = _endpoint_text(options)
    try:
        info = _quick(pafs, options, fs).get_file_info(bucket)
    except OSError as exc:
        raise ConfigError(_explain(where, bucket, endpoint, exc)) from None
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"{where}: bucket {bucket!r} does not exist at {endpoint}; create it or fix the URI "
                          "(or AWS_ENDPOINT_URL)")


def _options(fs) -> dict[str, Any]:
    """The options an ``S3FileSystem`` was made with (its pickled form), {} for anything else."""
    try:
        _, (options,) = fs.__reduce__()
    except (TypeError, ValueError):
        return {}
    return dict(options) if isinstance(options, dict) else {}


def _quick(pafs, options: dict[str, Any], fs):
    """The same filesystem with the preflight's short timeouts and attempts."""
    if not options:
        return fs
    try:
        return pafs.S3FileSystem(**{**options, "connect_timeout": PREFLIGHT_CONNECT_TIMEOUT_S,
                                    "request_timeout": PREFLIGHT_REQUEST_TIMEOUT_S,
                                    "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=PREFLIGHT_ATTEMPTS)})
    except (TypeError, ValueError):
        return fs


def _endpoint_text(options: Mapping[str, Any]) -> str:
    endpoint = options.get("endpoint_override") or ""
    if not endpoint:
        return f"AWS S3 (region {options.get('region') or 'default'})"
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name) and os.environ[name].rstrip("/") == endpoint.rstrip("/"):
            return f"{endpoint} ({name})"
    return endpoint


def _explain(where: str, bucket: str, endpoint: str, exc: OSError) -> str:
    """One line for a failed request: unreachable endpoint, refused credentials, or what the server said."""
    text = _one_line(exc)
    aws = _AWS_ERROR.search(text)
    code = aws.group(1) if aws else ""
    curl = _CURL.search(text)
    if code == "NETWORK_CONNECTION" or curl:
        cause = curl.group(2).strip().lower() if curl else "no connection"
        return (f"{where}: cannot reach the S3 endpoint {endpoint} ({cause}); check AWS_ENDPOINT_URL and that "
                "the server is up")
    if code in _CREDENTIAL_ERRORS or (aws and aws.group(2) == "403"):
        hint = "" if os.environ.get("AWS_ACCESS_KEY_ID") else " (AWS_ACCESS_KEY_ID is not set)"
        return (f"{where}: {endpoint} refused the credentials for bucket {bucket!r} ({code}){hint}; check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN and the bucket's permissions")
    hint = "" if os.environ.get("AWS_ACCESS_KEY_ID") else "; AWS_ACCESS_KEY_ID is not set"
    return f"{where}: {endpoint} could not be asked for bucket {bucket!r} ({text[:200]}){hint}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


__all__ = ["AWS_ENV_VARS", "S3_SCHEMES", "bucket_uri", "check_bucket", "check_object_store_locations",
           "is_object_store_uri", "worker_env_vars"]
