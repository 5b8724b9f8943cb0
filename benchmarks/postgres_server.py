"""A real PostgreSQL for the tests and the benchmarks that take a database away, from Debian's
package (`make setup` installs it): its initdb and postgres binaries on a free loopback port, with
a data folder of its own, stopped afterwards; never the system service. Without a password it
trusts every local connection; with one, it asks for it (scram-sha-256).

PostgreSQL refuses to run as root. Run as root (as CI runs), the binaries run as the package's
``postgres`` user through ``runuser``, on a folder under /tmp that user owns (pytest's own
temporary tree is closed to other users); run as anyone else, as that user.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from server.launcher import free_loopback_ports

SUPERUSER = "postgres"


def postgres_binaries() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parts[-3]))
    if not found:
        raise FileNotFoundError("PostgreSQL is not installed: `make setup` installs Debian's postgresql package")
    return found[-1].parent


@dataclass
class PostgresServer:
    port: int = field(default_factory=lambda: free_loopback_ports(1)[0])
    password: str | None = None  # the superuser's; None: trust
    folder: Path = field(init=False)

    def __post_init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="pc-postgres-"))
        self._binaries = postgres_binaries()
        self._run_as = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam(SUPERUSER)  # created by Debian's postgresql package
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self._run_as = ["runuser", "-u", SUPERUSER, "--"]

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def _run(self, binary: str, *args: str) -> None:
        subprocess.run([*self._run_as, str(self._binaries / binary), *args], check=True, capture_output=True, timeout=120)

    def start(self) -> "PostgresServer":
        if not (self.data / "PG_VERSION").exists():
            authentication = ["--auth=trust"]
            if self.password is not None:
                password_file = self.folder / "initdb-password"
                password_file.write_text(self.password)
                if self._run_as:
                    shutil.chown(password_file, SUPERUSER)
                authentication = ["--auth=scram-sha-256", f"--pwfile={password_file}"]
            self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, *authentication, "--encoding=UTF8", "--locale=C.UTF-8")
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.folder}"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "postgres.log"), "-w", "start")
        return self

    def stop(self) -> None:
        """Fast shutdown: sessions are ended, committed work is kept."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url("postgres"), password=self.password, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.remove()
