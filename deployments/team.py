"""What servers shared by a team need beyond one person's: credentials once they leave loopback, and
an object store for MLflow's artifacts.

Credentials come from the environment, under the names every client already reads, so the workers,
the watcher, the CLI, `mlflow models serve` and Ray workers (through their runtime env) need nothing
else: `PREFECT_API_AUTH_STRING` (the Prefect server's auth string, one for the whole team) and
`MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD` (squadtune's own MLflow account, the admin of
MLflow's basic-auth app). Nothing here writes a secret to a file, a command line or a log.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

WILDCARD = ("0.0.0.0", "::")


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclass(frozen=True)
class Credentials:
    prefect: str | None  # the Prefect server's auth string
    mlflow_user: str | None  # squadtune's MLflow account: the basic-auth app's admin
    mlflow_password: str | None

    @classmethod
    def from_env(cls) -> Credentials:
        get = os.environ.get
        return cls(get("PREFECT_API_AUTH_STRING") or None,
                   get("MLFLOW_TRACKING_USERNAME") or None, get("MLFLOW_TRACKING_PASSWORD") or None)

    @property
    def mlflow(self) -> bool:
        return bool(self.mlflow_user and self.mlflow_password)

    def refusal(self, host: str) -> str | None:
        """Why the servers must not start on `host` with these credentials, in one line."""
        if bool(self.mlflow_user) != bool(self.mlflow_password):
            return ("MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD go together: set both "
                    "(squadtune's MLflow account) or neither")
        if is_loopback(host):
            return None
        missing = [name for name, value in (
            ("PREFECT_API_AUTH_STRING", self.prefect),
            ("MLFLOW_TRACKING_USERNAME", self.mlflow_user),
            ("MLFLOW_TRACKING_PASSWORD", self.mlflow_password)) if not value]
        if missing:
            return (f"refusing to serve on {host} without credentials: export "
                    f"{', '.join(missing)} (README, Operations, \"For a team\"), or serve on "
                    "127.0.0.1")
        return None

    def prefect_env(self) -> dict[str, str]:
        return {"PREFECT_SERVER_API_AUTH_STRING": self.prefect} if self.prefect else {}

    def mlflow_server(self, run_dir: Path, auth_db: str) -> tuple[list[str], dict[str, str]]:
        """MLflow's basic-auth app: everyone reads (`default_permission = READ`), squadtune's own
        account is the admin, so only it moves aliases, tags versions or changes stages. The ini
        names no password: the admin's comes from the environment when the user store is new."""
        if not self.mlflow:
            return [], {}
        ini = run_dir / "mlflow-auth.ini"
        # Every request checks its password hash (PBKDF2, about 1 s of CPU on a loaded 2-core
        # machine): the cache checks each account once per 5 minutes. With one worker it is
        # never stale: a password changed through MLflow's API updates it at once.
        ini.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {auth_db}\nadmin_username = {self.mlflow_user}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 300\n")
        key = run_dir / "mlflow-csrf.key"  # Flask's CSRF key: any value, stable across restarts
        if not key.exists():
            key.touch(mode=0o600)
            key.write_text(secrets.token_hex(32))
        return ["--app-name", "basic-auth"], {
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_AUTH_ADMIN_USERNAME": self.mlflow_user,
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.mlflow_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": key.read_text().strip(),
        }

    def check_mlflow_login(self, url: str) -> str | None:
        """The account's password is set when MLflow's user store is created: say so when the
        environment's differs from it, instead of failing every client later."""
        import httpx

        if not self.mlflow:
            return None
        answer = httpx.get(f"{url}/api/2.0/mlflow/users/get",
                           params={"username": self.mlflow_user},
                           auth=(self.mlflow_user, self.mlflow_password), timeout=30)
        if answer.status_code == 401:
            return (f"MLflow at {url} rejects MLFLOW_TRACKING_USERNAME={self.mlflow_user} with "
                    "this MLFLOW_TRACKING_PASSWORD: its user store was created with another; "
                    "export that one, or change it with MLflow's update-password API")
        return None


@dataclass(frozen=True)
class Exposure:
    """Where the servers listen (`bind`), how this machine's clients reach them (`local`) and the
    name other machines and browsers use (`public`)."""

    bind: str
    local: str
    public: str

    @classmethod
    def of(cls, bind: str, public: str | None) -> Exposure:
        local = "127.0.0.1" if bind in WILDCARD or is_loopback(bind) else bind
        return cls(bind, local, public or (socket.getfqdn() if bind in WILDCARD else local))

    def mlflow_args(self, port: int) -> list[str]:
        """MLflow answers only localhost's Host headers unless told which others to trust."""
        if is_loopback(self.bind):
            return []
        hosts = [self.public, f"{self.public}:{port}", "localhost:*", "127.0.0.1:*"]
        if self.local != "127.0.0.1":
            hosts += [self.local, f"{self.local}:{port}"]
        return ["--allowed-hosts", ",".join(hosts),
                "--cors-allowed-origins", f"http://{self.public}:{port}"]


def check_bucket(destination: str) -> str | None:
    """An `s3://` artifact destination must answer before MLflow starts on it."""
    if not destination.startswith("s3://"):
        return None
    import boto3
    import botocore.exceptions

    bucket = destination.removeprefix("s3://").split("/", 1)[0]
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    try:
        boto3.client("s3", endpoint_url=endpoint).head_bucket(Bucket=bucket)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        where = f" at {endpoint}" if endpoint else ""
        return (f"the artifact bucket {bucket}{where} does not answer ({type(exc).__name__}: "
                f"{str(exc)[:120]}); check MLFLOW_S3_ENDPOINT_URL and the AWS_* credentials")
    return None
