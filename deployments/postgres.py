"""PostgreSQL for the team servers (`make up BACKEND=postgres`): a cluster of squadtune's own in the
state dir, or a team's server given as one URL (`--database-url`).

The own cluster is PostgreSQL's `initdb`/`pg_ctl` on 127.0.0.1 and a port chosen once, its data in
`<state>/postgres/data`, a password generated at `initdb` (`<state>/postgres/password`, mode 600)
that reaches the servers as `PGPASSWORD`, never inside a URL, a command line or a log. PostgreSQL
refuses to run as root, so under root it runs as `nobody`, and every folder above the state dir
must let others through. Either way the servers get three databases: `prefect` (with `pg_trgm`, as
Prefect needs), `mlflow` (tracking and registry) and `mlflow_auth` (MLflow's users and permissions).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

DATABASES = ("prefect", "mlflow", "mlflow_auth")
USER = "squadtune"
SERVER_USER = "nobody"  # who runs PostgreSQL when squadtune runs as root


class PostgresError(Exception):
    """A problem the user fixes; its message is one line naming the fix."""


@dataclass
class Server:
    """Where the databases live. The password stays out of every URL made from it."""

    host: str
    port: int
    user: str
    password: str | None

    @classmethod
    def from_url(cls, url: str) -> Server:
        parts = urlsplit(url)
        if parts.scheme.split("+")[0] not in ("postgresql", "postgres") or not parts.hostname:
            raise PostgresError(f"--database-url {parts.scheme}://{parts.hostname or ''}... is not "
                                "a PostgreSQL server URL; give postgresql://USER@HOST:PORT")
        if parts.password:  # a command line shows it to `ps`, make and shell history
            raise PostgresError(
                f"--database-url postgresql://{parts.username}:...@{parts.hostname} carries a "
                "password, which a command line shows to every user of the machine; give "
                "postgresql://USER@HOST:PORT and export PGPASSWORD")
        return cls(parts.hostname, parts.port or 5432, parts.username or USER,
                   os.environ.get("PGPASSWORD"))

    def url(self, database: str, driver: str = "") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{database}"

    @property
    def env(self) -> dict[str, str]:
        """What the servers' database drivers (libpq, asyncpg) read the password from."""
        return {"PGPASSWORD": self.password} if self.password else {}

    def connect(self, database: str):
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, user=self.user,
                               password=self.password, dbname=database, autocommit=True,
                               connect_timeout=10)

    def ensure_databases(self) -> None:
        """Create the three databases and Prefect's extension where they are missing."""
        import psycopg

        try:
            with self.connect("postgres") as conn:
                have = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
                for name in DATABASES:
                    if name not in have:
                        conn.execute(f'CREATE DATABASE "{name}"')
            with self.connect("prefect") as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        except psycopg.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PostgresError(
                f"PostgreSQL at {self.host}:{self.port} as {self.user}: {first}; the user needs "
                f"to create the databases {', '.join(DATABASES)} (or they must exist) and the "
                "pg_trgm extension in prefect; a password goes in PGPASSWORD") from None


def pg_bin() -> Path:
    """The folder of `initdb` and `pg_ctl`: $SQUADTUNE_PG_BIN, PATH, or Debian's layout."""
    if os.environ.get("SQUADTUNE_PG_BIN"):
        return Path(os.environ["SQUADTUNE_PG_BIN"])
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                      else 0)
    if not versions:
        raise PostgresError("PostgreSQL's server programs (initdb, pg_ctl) are not installed: "
                            "apt-get install postgresql, set SQUADTUNE_PG_BIN to their folder, or "
                            "give a team's server with --database-url")
    return versions[-1].parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """squadtune's own PostgreSQL cluster under `<state>/postgres`."""

    def __init__(self, state: Path):
        self.root = state / "postgres"
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.as_root = os.geteuid() == 0

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(pg_bin() / args[0]), *args[1:]]
        if self.as_root:  # initdb and postgres refuse to run as root
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120,
                              stdin=subprocess.DEVNULL)

    @property
    def port(self) -> int:
        return int((self.root / "port").read_text())

    @property
    def server(self) -> Server:
        return Server("127.0.0.1", self.port, USER, (self.root / "password").read_text().strip())

    def check_reachable(self) -> None:
        """Under root the server runs as `nobody`, which must be able to enter every folder above
        its data; say which one does not let it, before creating anything."""
        if not self.as_root:
            return
        import pwd

        uid = pwd.getpwnam(SERVER_USER).pw_uid
        for folder in reversed([p for p in self.root.parents if p.exists()]):
            info = folder.stat()
            if info.st_uid != uid and not info.st_mode & stat.S_IXOTH:
                raise PostgresError(
                    f"PostgreSQL runs as {SERVER_USER} under root, and {SERVER_USER} cannot enter "
                    f"{folder} (mode {stat.S_IMODE(info.st_mode):o}): use a --state-dir whose "
                    f"folders others may enter (chmod o+x {folder}), run as an ordinary user, or "
                    "give a team's server with --database-url")

    def init(self, port: int | None) -> None:
        """`initdb` with a generated password, listening on 127.0.0.1 only."""
        self.check_reachable()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        password = secrets.token_urlsafe(24)
        secret, pwfile = self.root / "password", self.root / "initdb.pw"
        for path in (secret, pwfile):  # private before the password is in it
            path.touch(mode=0o600)
            path.write_text(password + "\n")
        if self.as_root:
            os.chown(self.root, *self._ids())
            os.chown(pwfile, *self._ids())
        self.root.chmod(0o700)
        pwfile.chmod(0o600)
        try:
            self.run("initdb", "-D", str(self.data), "-U", USER, "-A", "scram-sha-256",
                     f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C.UTF-8")
        except subprocess.CalledProcessError as exc:
            raise PostgresError(f"initdb failed: {exc.stderr.strip().splitlines()[-1]}") from None
        finally:
            pwfile.unlink()
        port = port or free_port()
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\n# squadtune\nlisten_addresses = '127.0.0.1'\nport = {port}\n"
                       f"unix_socket_directories = '{self.root}'\n")
        (self.root / "port").write_text(f"{port}\n")

    def _ids(self) -> tuple[int, int]:
        import pwd

        entry = pwd.getpwnam(SERVER_USER)
        return entry.pw_uid, entry.pw_gid

    def pid(self) -> int | None:
        """The postmaster's pid while it runs on this data directory."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return None
        return pid if str(self.data).encode() in cmdline else None

    def start(self, port: int | None = None) -> int:
        """Create the cluster on first use, start it unless it runs, and return its pid."""
        if not (self.data / "PG_VERSION").exists():
            self.init(port)
        pid = self.pid()
        if pid is None:
            # A killed cluster's processes take a moment to go: a start before then is refused.
            for attempt in range(10):
                started = self.run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w",
                                   "-t", "120", "start", check=False)
                if started.returncode == 0:
                    break
                if attempt == 9:
                    tail = self.log.read_text()[-1000:] if self.log.exists() else ""
                    raise PostgresError(f"pg_ctl start failed; see {self.log}: {tail}")
                time.sleep(1)
            pid = self.pid()
        self.server.ensure_databases()
        return pid

    def stop(self) -> bool:
        if self.pid() is None:
            return False
        self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)
        return True


def database_of(settings: dict, state: Path) -> Server | None:
    """The PostgreSQL server of a state dir's settings, or None for SQLite."""
    if settings.get("backend") != "postgres":
        return None
    if settings.get("database_url"):
        return Server.from_url(settings["database_url"])
    return Cluster(state).server


def choose_settings(args, recorded: dict, running: list[str], state: Path) -> dict:
    """Where the data lives: the flags, else what the first `up` chose, else SQLite and local
    files. Changing it while servers run on the old one is refused."""
    backend = args.backend or recorded.get("backend", "sqlite")
    settings = {
        "backend": backend,
        "database_url": (args.database_url or recorded.get("database_url")
                         if backend == "postgres" else None),
        "artifacts": args.mlflow_artifacts or recorded.get("artifacts")
        or str(state / "mlartifacts"),
    }
    if settings["database_url"]:  # without a password (refused in it): that is PGPASSWORD's
        server = Server.from_url(settings["database_url"])
        settings["database_url"] = f"postgresql://{server.user}@{server.host}:{server.port}"
    changed = sorted(k for k in settings if recorded and recorded.get(k) != settings[k])
    if changed and running:
        raise PostgresError(
            f"{', '.join(changed)} differ from what the running servers use "
            f"({', '.join(sorted(running))}): make down first, or use another --state-dir")
    return settings


def start_database(settings: dict, state: Path, port: int | None) -> tuple[str | None, int | None]:
    """Start the state dir's own cluster, or check a team's server: a line to print, and the
    pid of a cluster started here."""
    if settings["backend"] != "postgres":
        return None, None
    if settings["database_url"]:
        server = database_of(settings, state)
        server.ensure_databases()
        return f"PostgreSQL        {server.host}:{server.port} (a team's server)", None
    cluster = Cluster(state)
    pid = cluster.start(port)
    return f"PostgreSQL        127.0.0.1:{cluster.port} (data in {cluster.data})", pid
