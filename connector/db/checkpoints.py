"""SQLite's WAL checkpoints on a thread of their own.

In WAL mode a commit appends pages to the write-ahead log, and a checkpoint copies them into
the database file (and syncs it). SQLite's own checkpoints run inside the commit that takes
the log past 1,000 pages, which then waits for them: some 5-15 ms here, every second or so
under a burst of webhooks. The webhook inbox commits on the event loop's thread
(:mod:`connector.inbound.inbox`), where such a commit stalls every request in flight, so the
engine's connections do not checkpoint (``wal_autocheckpoint = 0``) and a
:class:`WalCheckpointer` per connection does it beside them, with a connection of its own:
a PASSIVE checkpoint neither waits for writers nor blocks them, and the sqlite3 module lets go
of the GIL while it runs.

A passive checkpoint copies what the log held when it began. While writers never pause, the
log is never wholly copied at a moment no one writes, and SQLite starts it over only then, so
it would grow for as long as the burst lasts: past :data:`RESTART_PAGES` the checkpointer
asks for a RESTART, which makes writers wait (at most :data:`RESTART_WAIT_MS`) while it
copies the rest and lets the next writer start the log over. The inbox meets that as a lock
another connection holds, and waits for it off the event loop.
"""

from __future__ import annotations

import logging
import sqlite3
import threading

log = logging.getLogger("connector.db")

# How often what the log gained is copied (a checkpoint with nothing to copy costs nothing).
CHECK_SECONDS = 0.1
# Pages (4 KiB each) the log may hold before writers are made to wait for a checkpoint that
# starts it over (64 MiB).
RESTART_PAGES = 16_000
# How long a RESTART waits for the writer and the readers under way before it gives up (and
# tries again at the next look).
RESTART_WAIT_MS = 1000


class WalCheckpointer:
    """Checkpoints the WAL of the SQLite database at ``path`` until :meth:`stop`."""

    def __init__(self, path: str):
        self._path = path
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoints", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            connection = sqlite3.connect(
                self._path, isolation_level=None, timeout=RESTART_WAIT_MS / 1000
            )
        except sqlite3.Error:
            log.exception("the WAL checkpointer could not open %s", self._path)
            return
        try:
            while not self._stopping.wait(CHECK_SECONDS):
                try:
                    checkpoint(connection)
                except sqlite3.Error as exc:
                    # The database is still written to; the log waits for the next look.
                    log.warning("WAL checkpoint failed: %s", exc)
        finally:
            connection.close()


def checkpoint(connection: sqlite3.Connection) -> None:
    """Copy what the log gained through ``connection``; start it over when it holds
    :data:`RESTART_PAGES`."""
    _busy, pages, _copied = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    if pages >= RESTART_PAGES:
        connection.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
