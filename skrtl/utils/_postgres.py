"""A throwaway local PostgreSQL server, for trying multi-process Optuna searches on one machine.

The tests and the distributed-search benchmark use it; users can too, to rehearse a shared
study before pointing the workers at a real database server. It needs PostgreSQL's server
binaries (``initdb``, ``pg_ctl``; Debian: ``apt-get install postgresql``) and a driver
(``psycopg2``). The server listens on 127.0.0.1 only, trusts local connections, and is deleted
with its data when the context exits.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator

__all__ = ["find_postgres_bin", "throwaway_postgres"]


def find_postgres_bin() -> str | None:
    """Folder of PostgreSQL's server binaries (``initdb``, ``pg_ctl``), or None."""
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(os.path.realpath(initdb))
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def throwaway_postgres(dbname: str = "skrtl", *, timeout: float = 60.0) -> Iterator[str]:
    """Start a private PostgreSQL server; yield its SQLAlchemy URL; stop and delete it.

    Parameters
    ----------
    dbname : str, default="skrtl"
        Database created in the new cluster.
    timeout : float, default=60.0
        Seconds to wait for the server to start.

    Yields
    ------
    str
        ``"postgresql+psycopg2://postgres@127.0.0.1:<port>/<dbname>"``.

    Raises
    ------
    RuntimeError
        When the server binaries are missing or the server does not start.
    """
    bindir = find_postgres_bin()
    if bindir is None:
        raise RuntimeError(
            "PostgreSQL's server binaries (initdb, pg_ctl) were not found; install them "
            "(Debian: apt-get install postgresql)."
        )
    # PostgreSQL refuses to run as root: run it as the 'postgres' system user then
    as_user: list[str] = []
    owner = None
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        import pwd

        try:
            owner = pwd.getpwnam("postgres")
        except KeyError as exc:
            raise RuntimeError("running as root needs a 'postgres' system user") from exc
        as_user = ["runuser", "-u", "postgres", "--"]
    root = tempfile.mkdtemp(prefix="skrtl-pg-")
    data = os.path.join(root, "data")
    os.mkdir(data)
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
        os.chown(data, owner.pw_uid, owner.pw_gid)
    port = _free_port()

    def run(*args, **kw):
        return subprocess.run(
            [*as_user, *args], check=True, capture_output=True, text=True, timeout=timeout, **kw
        )

    started = False
    try:
        run(os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E",
            "UTF8", "--locale=C")  # fmt: skip
        opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        run(os.path.join(bindir, "pg_ctl"), "-D", data, "-o", opts, "-w", "-t",
            str(int(timeout)), "-l", os.path.join(root, "server.log"), "start")  # fmt: skip
        started = True
        run(os.path.join(bindir, "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U",
            "postgres", dbname)  # fmt: skip
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{dbname}"
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(
            f"the throwaway PostgreSQL server failed ({exc.cmd[len(as_user)]}): {exc.stderr}"
        ) from exc
    finally:
        if started:
            with contextlib.suppress(Exception):
                run(os.path.join(bindir, "pg_ctl"), "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)
