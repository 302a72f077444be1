"""Notes plugin: spoken notes in SQLite (``ctx.data_dir / "notes.sqlite3"``).

Intents: ``VaaniAddNote`` (slot ``note``: the text, kept verbatim), ``VaaniReadNotes``, ``VaaniDeleteNote``
(slot ``scope``: ``all`` or ``last``). Every query is parameterised (``?`` placeholders), so quotes, ``%``,
``_`` and SQL such as ``'; DROP TABLE notes; --`` are stored as plain text. Notes survive restarts.
"""
from __future__ import annotations

import sqlite3
from contextlib import closing

from mani_jax.voice.nlu import Intent
from mani_jax.voice.plugins import Plugin, PluginContext, Response

__all__ = ["NotesPlugin", "NotesStore"]

MAX_NOTE_CHARS = 1000
READ_LIMIT = 5


class NotesStore:
    """Tiny SQLite note store. ``path``: the database file (created with its table if missing)."""

    def __init__(self, path):
        self.path = path
        with closing(self._connect()) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                       "text TEXT NOT NULL, created TEXT NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=5)

    def add(self, text: str, created: str) -> int:
        """Insert a note; return its id."""
        with closing(self._connect()) as db, db:
            return db.execute("INSERT INTO notes (text, created) VALUES (?, ?)", (text, created)).lastrowid

    def all(self) -> list[tuple[int, str, str]]:
        """All notes as ``(id, text, created)``, oldest first."""
        with closing(self._connect()) as db:
            return db.execute("SELECT id, text, created FROM notes ORDER BY id").fetchall()

    def delete_all(self) -> int:
        """Delete every note; return how many were deleted."""
        with closing(self._connect()) as db, db:
            return db.execute("DELETE FROM notes").rowcount

    def delete_last(self) -> str | None:
        """Delete the newest note; return its text (``None`` if there were none)."""
        with closing(self._connect()) as db, db:
            row = db.execute("SELECT id, text FROM notes ORDER BY id DESC LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM notes WHERE id = ?", (row[0],))
            return row[1]


class NotesPlugin(Plugin):
    """Add, read and delete spoken notes."""

    name = "notes"
    intents = ("VaaniAddNote", "VaaniReadNotes", "VaaniDeleteNote")

    def __init__(self, ctx: PluginContext):
        super().__init__(ctx)
        ctx.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = NotesStore(ctx.data_dir / "notes.sqlite3")

    def handle(self, intent: Intent) -> Response:
        if intent.name == "VaaniAddNote":
            text = str(intent.slots.get("note", "")).strip()
            if not text:
                return self.reply("क्या नोट करूँ? जैसे, नोट करो दूध खरीदना है।", ok=False, error="empty_note")
            if len(text) > MAX_NOTE_CHARS:
                return self.reply("यह नोट बहुत लंबा है, कृपया छोटा करके बोलिए।", ok=False, error="too_long")
            note_id = self.store.add(text, self.ctx.now().isoformat(timespec="seconds"))
            return self.reply(f"नोट कर लिया: {text}", note_id=note_id)
        if intent.name == "VaaniReadNotes":
            notes = self.store.all()
            if not notes:
                return self.reply("अभी कोई नोट नहीं है।", count=0, notes=[])
            recent = notes[-READ_LIMIT:]
            spoken = "। ".join(f"{i}. {text}" for i, (_id, text, _c) in enumerate(recent, 1))
            head = f"आपके {len(notes)} नोट हैं" + (f", आखिरी {len(recent)}" if len(notes) > len(recent) else "")
            return self.reply(f"{head}: {spoken}।", count=len(notes), notes=[n[1] for n in notes])
        scope = intent.slots.get("scope", "last")
        if scope == "all":
            count = self.store.delete_all()
            if not count:
                return self.reply("मिटाने के लिए कोई नोट नहीं है।", ok=False, count=0)
            return self.reply(f"सारे {count} नोट मिटा दिए।", count=count)
        text = self.store.delete_last()
        if text is None:
            return self.reply("मिटाने के लिए कोई नोट नहीं है।", ok=False, count=0)
        return self.reply(f"आखिरी नोट मिटा दिया: {text}", count=1, deleted=text)
