"""A real PgBouncer in ``transaction`` pooling mode, started for the tests.

It listens on a free loopback port and forwards every database to the test
PostgreSQL server (trust authentication).  ``max_prepared_statements`` does
not exist in the Debian 1.18 package: like every PgBouncer before 1.21 it
passes prepared statements through unchanged, so a client that relies on one
breaks as soon as its next transaction lands on another server connection,
which is exactly what the ``listen=False`` broker must never do.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

PGBOUNCER_CANDIDATES = ("/usr/sbin/pgbouncer", "pgbouncer")


def find_pgbouncer() -> str | None:
    """The PgBouncer executable, or ``None`` when it is not installed."""
    for candidate in PGBOUNCER_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_pgbouncer(database_url: str, *, pool_size: int = 20) -> Iterator[str]:
    """Start PgBouncer in front of ``database_url``'s server; yield a URL through it."""
    binary = find_pgbouncer()
    if binary is None:
        raise FileNotFoundError("pgbouncer is not installed (apt-get install pgbouncer)")
    target = sa.make_url(database_url)
    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="botkit-pgbouncer-"))
    # PgBouncer refuses to run as root; as root it is started with -u postgres,
    # which must be able to read its files.
    workdir.chmod(0o755)
    user = target.username or "postgres"
    (workdir / "users.txt").write_text(f'"{user}" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={target.host or '127.0.0.1'} port={target.port or 5432}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {workdir / 'users.txt'}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {pool_size}\n"
        "max_client_conn = 1000\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
        "server_check_delay = 0\n"
    )
    for name in ("users.txt", "pgbouncer.ini"):
        (workdir / name).chmod(0o644)
    command = [binary, str(workdir / "pgbouncer.ini")]
    if os.geteuid() == 0:
        command[1:1] = ["-u", "postgres"]
    log = open(workdir / "pgbouncer.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = target.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"pgbouncer exited ({proc.returncode}): "
                    + (workdir / "pgbouncer.log").read_text(errors="replace")
                )
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
