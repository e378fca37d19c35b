"""An S3-compatible server on loopback for the tests: moto's server mode (what Ray's own test
suite uses for S3), run as its own process so Ray workers, job drivers and the test process all
reach it over HTTP, and stopped by its pid.

IAM authentication is on: the server refuses requests that are not signed with the access key it
issued at start-up (:attr:`S3Server.access_key`), so a wrong key or secret fails as on AWS.
Everything that talks to it is configured by the standard AWS variables (:meth:`S3Server.env`)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

REGION = "us-east-1"
#: a policy that allows every S3 action on every bucket, for the user the server issues keys to
S3_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    """A running moto server: its process, endpoint and the one valid key pair."""

    process: subprocess.Popen
    endpoint: str
    access_key: str
    secret_key: str
    log_path: str

    def env(self, **overrides: str) -> dict[str, str]:
        """The standard AWS variables that point a client (pyarrow, Ray, boto3) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION,
                **overrides}

    def filesystem(self):
        """A pyarrow ``S3FileSystem`` on this server (for the test process, whose environment stays clean)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint, access_key=self.access_key,
                                 secret_key=self.secret_key, region=REGION)

    def client(self, service: str = "s3"):
        """A boto3 client of ``service`` signed with the server's key (test set-up and inspection)."""
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=REGION)

    def create_bucket(self, prefix: str = "must", versioned: bool = False) -> str:
        """A new, empty bucket with a unique name. ``versioned``: a test can count how often an
        object was written (:meth:`versions`); but moto 5.2 then still lists a deleted folder as a
        folder (AWS does not), so a versioned bucket only suits runs that delete nothing."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        s3 = self.client()
        s3.create_bucket(Bucket=name)
        if versioned:
            s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name

    def versions(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """``{key: number of versions written}`` under ``prefix`` of a versioned bucket."""
        out: dict[str, int] = {}
        for page in self.client().get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
            for v in page.get("Versions", []):
                out[v["Key"]] = out.get(v["Key"], 0) + 1
        return out

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server process (by its pid) and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)


def _moto_server_command() -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("moto_server")
    if found:
        return [found]
    return [sys.executable, "-m", "moto.server"]


def _wait_until_up(endpoint: str, process: subprocess.Popen, log_path: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode}: {Path(log_path).read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer at {endpoint} within {timeout_s:.0f} s")


def _issue_key(endpoint: str) -> tuple[str, str]:
    """Create an IAM user allowed every S3 action and return its key pair (while auth is still off)."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup",
                       region_name=REGION)
    iam.create_user(UserName="must-ray")
    iam.put_user_policy(UserName="must-ray", PolicyName="s3", PolicyDocument=json.dumps(S3_POLICY))
    key = iam.create_access_key(UserName="must-ray")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def _enable_auth(endpoint: str) -> None:
    """From now on every request must be signed by a key the server issued (moto's IAM checks)."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def start_s3_server(log_dir: str, port: int | None = None, timeout_s: float = 60.0) -> S3Server:
    """Start moto's server on 127.0.0.1 (a free port unless ``port``), issue a key, turn auth on."""
    port = port or free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = os.path.join(log_dir, f"moto-{port}.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([*_moto_server_command(), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    server = S3Server(process, endpoint, "", "", log_path)
    try:
        _wait_until_up(endpoint, process, log_path, timeout_s)
        server.access_key, server.secret_key = _issue_key(endpoint)
        _enable_auth(endpoint)
    except BaseException:
        server.stop()
        raise
    return server


__all__ = ["REGION", "S3Server", "free_port", "start_s3_server"]
