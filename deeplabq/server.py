"""The team tracking server (``bash dev.sh server``): ``mlflow server`` with MLflow's basic-auth app, its runs and
users in a PostgreSQL cluster of its own (Debian's ``postgresql`` package), artifacts proxied through the server
(``--artifacts-destination``), so a client needs only the address and its credentials, no file access.

Everything lives in one folder (``--dir``, default ``$DEEPLABQ_SERVER_DIR`` or ``<repo>/server``): ``pgdata/`` (the
cluster), ``artifacts/``, ``basic_auth.ini``, ``pgpass`` (the database password, made on first start) and
``admin_password`` (the MLflow admin's, made on first start unless MLFLOW_AUTH_ADMIN_PASSWORD is set), the last
two readable by their owner only. PostgreSQL listens on 127.0.0.1 on a free port, with a password: only the
MLflow server talks to it. Run as root, PostgreSQL (which refuses root) runs as the ``postgres`` user.

Every option it does not know (``--host``, ``--port``, ``--workers``, ``--allowed-hosts`` ...) goes to
``mlflow server`` as is, with MLflow's defaults and environment variables (MLFLOW_HOST, MLFLOW_PORT ...).
Ctrl-C (or SIGTERM) stops both servers; both also stop if this process dies.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from deeplabq.errors import UserError

DB_USER = "mlflow"
DB_NAME, AUTH_DB_NAME = "mlflow", "mlflow_auth"
ADMIN = "admin"
PG_USER = "postgres"  # who runs PostgreSQL when this runs as root
START_TIMEOUT = 180.0
AUTH_CACHE_SECONDS = 60  # a changed password or a deleted user is refused at most this late (per worker)


class ServerError(UserError, RuntimeError):
    """The tracking server cannot start here (PostgreSQL missing, a folder it cannot use, a port in use)."""


def postgres_bindir() -> Path:
    """Where PostgreSQL's server programs are: Debian's /usr/lib/postgresql/<version>/bin (newest), else PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).resolve().parent
    raise ServerError("PostgreSQL is not installed (no postgres in /usr/lib/postgresql/*/bin or on PATH); "
                      "on Debian: apt-get install postgresql")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(sig: int):
    """A preexec_fn: the child gets ``sig`` when this process dies, so no server outlives it (Linux)."""
    def preexec() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
    return preexec


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _wait_http(url: str, process: subprocess.Popen, log: Path | None, timeout: float) -> None:
    """Until ``url`` answers 200; the server's exit or the timeout is an error with its log's end (if it has one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"the MLflow server exited with status {process.returncode}"
                              + (f"; its log {log} ends:\n{_tail(log)}" if log else " (its output is above)"))
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.HTTPError):
            time.sleep(0.5)
    raise ServerError(f"the MLflow server did not answer {url} within {timeout:.0f} s"
                      + (f"; its log {log} ends:\n{_tail(log)}" if log else ""))


def _tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


class TrackingServer:
    """PostgreSQL + ``mlflow server --app-name basic-auth`` over one state folder; a context manager.

    ``mlflow_args`` are passed to ``mlflow server`` (``--workers 2`` ...). ``start()`` initializes what is missing
    (cluster, databases, passwords, auth config), starts both and waits until the server answers.
    """

    def __init__(self, state_dir: str | Path, host: str = "127.0.0.1", port: int = 5000, mlflow_args=(),
                 verbose: bool = False) -> None:
        self.dir = Path(state_dir).resolve()
        self.host, self.port, self.mlflow_args = host, int(port), list(mlflow_args)
        self.pgdata, self.artifacts = self.dir / "pgdata", self.dir / "artifacts"
        self.pgpass, self.admin_password_file = self.dir / "pgpass", self.dir / "admin_password"
        self.auth_config = self.dir / "basic_auth.ini"
        self.verbose = verbose
        self.pg_port: int | None = None
        self.postgres: subprocess.Popen | None = None
        self.mlflow: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    # -- PostgreSQL -------------------------------------------------------------------------------------------
    def _pg_identity(self) -> dict:
        """Popen arguments that run a PostgreSQL program as an unprivileged user when this process is root."""
        if os.geteuid() != 0:
            return {}
        try:
            user = pwd.getpwnam(PG_USER)
        except KeyError as error:
            raise ServerError(f"PostgreSQL refuses to run as root and there is no '{PG_USER}' user "
                              "(Debian's postgresql package makes it)") from error
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    def _check_reachable(self, ident: dict) -> None:
        """As root, every folder above pgdata must let the postgres user in."""
        if not ident:
            return
        for folder in [self.dir, *self.dir.parents]:
            st = folder.stat()
            mode = st.st_mode
            if not (mode & 0o001 or (st.st_uid == ident["user"] and mode & 0o100)
                    or (st.st_gid == ident["group"] and mode & 0o010)):
                raise ServerError(f"PostgreSQL runs as user '{PG_USER}' (it refuses root), which cannot enter "
                                  f"{folder} (mode {oct(mode & 0o777)}): choose another --dir (or "
                                  "DEEPLABQ_SERVER_DIR), or chmod o+x that folder")

    def _pg(self, program: str, *args: str, ident: dict) -> None:
        done = subprocess.run([str(postgres_bindir() / program), *args], capture_output=True, text=True,
                              cwd="/", **ident)
        if done.returncode != 0:
            raise ServerError(f"{program} failed (status {done.returncode}): {(done.stderr or done.stdout).strip()}")

    def _init_cluster(self, ident: dict) -> None:
        if (self.pgdata / "PG_VERSION").is_file():
            return
        password = secrets.token_urlsafe(24)
        _write_private(self.pgpass, f"127.0.0.1:*:*:{DB_USER}:{password}\n")
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        pwfile = self.dir / ".initdb_password"
        _write_private(pwfile, password + "\n")
        try:
            if ident:
                os.chown(self.pgdata, ident["user"], ident["group"])
                os.chown(pwfile, ident["user"], ident["group"])
            self._pg("initdb", "-D", str(self.pgdata), "-U", DB_USER, "--pwfile", str(pwfile),
                     "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8", "--no-locale",
                     ident=ident)
        finally:
            pwfile.unlink(missing_ok=True)

    def start_postgres(self) -> None:
        ident = self._pg_identity()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._check_reachable(ident)
        self._init_cluster(ident)
        self.pg_port = free_port()
        log = self.dir / "postgres.log"
        log_file = open(log, "ab")  # noqa: SIM115 (closed with the process)
        self.postgres = subprocess.Popen(
            [str(postgres_bindir() / "postgres"), "-D", str(self.pgdata), "-p", str(self.pg_port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.pgdata}"],
            stdout=log_file, stderr=subprocess.STDOUT, cwd="/", preexec_fn=_die_with_parent(signal.SIGINT), **ident)
        log_file.close()
        self._wait_postgres(log)
        self._create_databases()

    def _connect(self, dbname: str):
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.pg_port, user=DB_USER, dbname=dbname,
                               passfile=str(self.pgpass), connect_timeout=5, autocommit=True)

    def _wait_postgres(self, log: Path) -> None:
        import psycopg

        deadline = time.monotonic() + 60
        while True:
            if self.postgres.poll() is not None:
                raise ServerError(f"PostgreSQL exited with status {self.postgres.returncode}; {log} ends:\n"
                                  + _tail(log))
            try:
                self._connect("postgres").close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise ServerError(f"PostgreSQL did not accept connections within 60 s; {log} ends:\n"
                                      + _tail(log)) from None
                time.sleep(0.2)

    def _create_databases(self) -> None:
        with self._connect("postgres") as connection:
            for name in (DB_NAME, AUTH_DB_NAME):
                if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                    connection.execute(f'CREATE DATABASE "{name}"')

    def db_uri(self, name: str = DB_NAME) -> str:
        return f"postgresql+psycopg://{DB_USER}@127.0.0.1:{self.pg_port}/{name}"  # the password: PGPASSFILE

    # -- MLflow -----------------------------------------------------------------------------------------------
    def _secret(self, name: str) -> str:
        """A random secret kept in the state folder (readable by its owner only), made on first use."""
        path = self.dir / name
        if not path.is_file():
            _write_private(path, secrets.token_urlsafe(24) + "\n")
        return path.read_text().strip()

    def _admin_password(self) -> str | None:
        """The admin password MLflow creates its admin with on first start (ignored once the admin exists)."""
        if os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
            return os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"]
        return self._secret(self.admin_password_file.name)

    def start_mlflow(self) -> None:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.auth_config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {self.db_uri(AUTH_DB_NAME)}\n"
                                    f"admin_username = {ADMIN}\n"
                                    # a password check is PBKDF2 (~0.3 s of CPU): once a minute, not per request
                                    f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n"
                                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(self.auth_config), PGPASSFILE=str(self.pgpass),
                   MLFLOW_AUTH_ADMIN_PASSWORD=self._admin_password(),
                   MLFLOW_FLASK_SERVER_SECRET_KEY=self._secret("flask_secret_key"))  # CSRF of the auth pages
        # MLflow's job runner (seven huey consumers) runs GenAI scorers and trace jobs, which deeplabq has none of:
        # off unless asked for, it halves the start time on 2 cores
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        log = self.dir / "mlflow.log"
        with open(log, "ab") as log_file:
            self.mlflow = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                 "--backend-store-uri", self.db_uri(), "--artifacts-destination", str(self.artifacts),
                 "--host", self.host, "--port", str(self.port), *self.mlflow_args],
                env=env, stdout=None if self.verbose else log_file, stderr=None if self.verbose else log_file,
                start_new_session=True, preexec_fn=_die_with_parent(signal.SIGTERM))
        _wait_http(f"{self.url}/health", self.mlflow, None if self.verbose else log, START_TIMEOUT)

    def stop_mlflow(self, sig: int = signal.SIGTERM) -> None:
        """Stop the MLflow server (its whole process group): SIGTERM lets requests finish, SIGKILL is a crash."""
        if self.mlflow is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.mlflow.pid, sig)
        try:
            self.mlflow.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.mlflow.pid, signal.SIGKILL)
            self.mlflow.wait()
        with contextlib.suppress(ProcessLookupError):  # workers left behind by a killed master
            os.killpg(self.mlflow.pid, signal.SIGKILL)
        self.mlflow = None

    def stop_postgres(self) -> None:
        if self.postgres is None:
            return
        self.postgres.send_signal(signal.SIGINT)  # fast shutdown: roll back open transactions, checkpoint
        try:
            self.postgres.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.postgres.kill()
            self.postgres.wait()
        self.postgres = None

    def start(self) -> TrackingServer:
        try:
            self.start_postgres()
            self.start_mlflow()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.stop_mlflow()
        self.stop_postgres()

    def __enter__(self) -> TrackingServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="bash dev.sh server", description=__doc__.split("\n\n")[0],
        epilog="Other options go to `mlflow server` (--workers, --allowed-hosts, ...).")
    parser.add_argument("--dir", default=os.environ.get("DEEPLABQ_SERVER_DIR") or
                        str(Path(__file__).resolve().parent.parent / "server"),
                        help="state folder: cluster, artifacts, passwords (default: $DEEPLABQ_SERVER_DIR or "
                             "<repo>/server)")
    parser.add_argument("--host", default=os.environ.get("MLFLOW_HOST", "127.0.0.1"),
                        help="interface to listen on (default: $MLFLOW_HOST or 127.0.0.1; 0.0.0.0 for a team)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("MLFLOW_PORT", "5000")),
                        help="default: $MLFLOW_PORT or 5000")
    args, mlflow_args = parser.parse_known_args(argv)
    server = TrackingServer(args.dir, args.host, args.port, mlflow_args, verbose=True)
    stop = {"now": False}

    def on_signal(signum, frame):  # SIGTERM as Ctrl-C: leave the loop, stop both servers
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except UserError as error:
        print(f"deeplabq: error: {error}", file=sys.stderr)
        return 2
    admin = (f"{server.admin_password_file} (readable by you only)" if server.admin_password_file.is_file()
             and not os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD") else "MLFLOW_AUTH_ADMIN_PASSWORD")
    print(f"deeplabq: tracking server at {server.url} (runs and users: PostgreSQL on 127.0.0.1:{server.pg_port}, "
          f"artifacts: {server.artifacts}, served through the server)\n"
          f"  admin user '{ADMIN}', its password: {admin} (used on first start only)\n"
          f"  clients: tracking.tracking_uri={server.url} with MLFLOW_TRACKING_USERNAME and "
          "MLFLOW_TRACKING_PASSWORD in the environment\n  Ctrl-C stops it", flush=True)
    try:
        while not stop["now"]:
            if server.mlflow.poll() is not None or server.postgres.poll() is not None:
                print("deeplabq: error: a server process exited; see the logs in " + str(server.dir), file=sys.stderr)
                return 1
            time.sleep(0.5)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
