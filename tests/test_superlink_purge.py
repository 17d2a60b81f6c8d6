"""Unlearning deletes every copy (issue 11, item 8, server part): the SuperLink database keeps no
bytes of deleted rows. A real SQLite file in WAL mode with Flower's own pragmas (busy_timeout, WAL,
synchronous NORMAL, mmap) holds a site update; the row is deleted as Flower's `cleanup_run` does.
Without the purge the update's bytes stay in the raw files; after `purge_database` they do not."""

from __future__ import annotations

import sqlite3

import numpy as np
from flwr.supercore.constant import SQLITE_PRAGMAS

from facefed.server.ops.linkd import purge_database


def raw(dir_, needle: bytes) -> list[str]:
    return [p.name for p in sorted(dir_.iterdir()) if p.is_file() and needle in p.read_bytes()]


def flower_like_db(path):
    con = sqlite3.connect(path, isolation_level=None)
    for pragma, value in SQLITE_PRAGMAS:
        con.execute(f"PRAGMA {pragma} = {value}")
    con.execute("CREATE TABLE objects (id TEXT PRIMARY KEY, content BLOB)")
    return con


def test_deleted_site_update_is_unrecoverable_after_the_purge(tmp_path):
    update = (np.arange(4096, dtype=np.float32) * np.float32(0.000123) + np.float32(7.77)).tobytes()
    needle = update[1000:1064]  # a distinctive run of the update's floats
    db = tmp_path / "superlink.db"
    con = flower_like_db(db)  # the SuperLink's connection stays open throughout, as in the live server
    con.execute("INSERT INTO objects VALUES ('filler', ?)", (b"\x01" * 20000,))
    con.execute("INSERT INTO objects VALUES ('site-update', ?)", (update,))
    con.execute("DELETE FROM objects WHERE id = 'site-update'")  # what cleanup_run does
    assert raw(tmp_path, needle), "the deleted update should still be in the raw files before the purge"

    purge_database(db)
    assert raw(tmp_path, needle) == []
    assert (tmp_path / "superlink.db-wal").stat().st_size == 0
    assert con.execute("SELECT length(content) FROM objects").fetchall() == [(20000,)]  # live rows intact
    con.close()
