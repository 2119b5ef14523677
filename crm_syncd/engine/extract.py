"""Step 2: a source's new rows into the outbox, with the mark that says how far it was read."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from crm_syncd.engine.owner import OwnAddresses
from crm_syncd.engine.reports import SourceReport
from crm_syncd.identity import PEOPLE, Normalizer
from crm_syncd.logs import get_logger
from crm_syncd.settings import Settings
from crm_syncd.sources import BEFORE_WINDOW, Batch, sqlite
from crm_syncd.sources.calls import CallsReader
from crm_syncd.sources.messages import MessagesReader
from crm_syncd.sources.sqlite import SourceReader
from crm_syncd.store import Mark, NewItem, Store, now_ms

log = get_logger("crm_syncd.engine")

SOURCES = ("messages", "calls")
DAY_MS = 86_400_000


def file_id(path: Path) -> str:
    """Identity of a database file: a restored or recreated file gets a new inode."""
    if (st := sqlite.stat(Path(path))) is None:
        raise FileNotFoundError(path)
    return f"{st.st_dev}:{st.st_ino}"


class Extractor:
    """Reads a source past its high-water mark in bounded batches and moves the rows into the outbox
    together with the new mark (one transaction per batch)."""

    def __init__(self, settings: Settings, store: Store, normalize: Normalizer, owner: OwnAddresses,
                 stopping: threading.Event) -> None:
        self.settings = settings
        self.store = store
        self.normalize = normalize
        self.owner = owner
        self.stopping = stopping  # set by a stopping process: extractions end at their next batch
        self.readers: dict[str, SourceReader] = {
            "messages": MessagesReader(settings.messages_db, group_messages=settings.group_messages, stop=stopping),
            "calls": CallsReader(settings.calls_db, stop=stopping),
        }
        self._people_seen: dict[str, list] = {}  # messages → the `people` it last noted

    def extract(self, source: str, *, full: bool = False, days: int | None = None,
                progress: Callable[[int], None] | None = None) -> SourceReport:
        """Move new rows of one source into the outbox. Blocking; run it off the event loop."""
        report = SourceReport(source)
        reader = self.readers[source]
        try:
            current_file = file_id(reader.path)
        except FileNotFoundError:
            report.missing = True
            log.warning("extract.missing", source=source, path=str(reader.path))
            return report
        mark = self.store.mark(source)
        # an upgrade made rows an earlier version dropped new again (store migration 8): read once more over
        # the lookback window, behind the mark, as `--days` does (a source without a mark has nothing behind it)
        reread = not full and days is None and self.store.to_reread(source)
        if reread and mark is None:
            self.store.reread_done(source)
            reread = False
        elif reread:
            days = self.settings.initial_lookback_days
            log.info("extract.reread", source=source, days=days)
        now = now_ms()
        since = now - days * DAY_MS if days is not None else None
        after, floor = 0, 0
        verdicts: dict[str | tuple[str, str], tuple[str, bool]] = {}  # raw address [and country] -> _counterpart
        with reader.session() as session:
            self.owner.named_by(source, session.own_addresses())
            self._people(source, session.people())
            if mark is None and since is None and not full:
                since = now - self.settings.initial_lookback_days * DAY_MS
            elif mark is not None and self._replaced(session, mark, current_file):
                # told for --full too (and the daily sweep): the mark it keeps as a floor is the old database's
                report.rebuilt = True
                log.warning("extract.rebuilt", source=source, mark=mark.rowid)
                if since is not None or not full:  # as a first sync: the lookback window (a --days run's, if wider)
                    since = min(since or now, now - self.settings.initial_lookback_days * DAY_MS)
            elif mark is not None and (full or days is not None):  # from the start too, never moving the mark back
                floor = mark.rowid
            elif mark is not None:
                after = mark.rowid
            resumed = mark is not None and not report.rebuilt  # else a lookback pass
            # rows already in the outbox may come again: all of them (--full, a rebuild), or those above a
            # mark an earlier pass held (a send under way, a --days run) while it went on queueing
            rereading = mark is not None
            # The window this pass's marks carry (a pass that completes drops it):
            if not resumed:  # a lookback pass's own: a mark saved part-way (a send under way, a crash) keeps it
                window = since
            elif full:  # --full reads past the mark without one
                window = None
            else:  # the one a lookback pass that stopped part-way left in the mark
                window = mark.window_ms
            # ... and the last row it is for: rows past it came after a lookback pass had read every row (held
            # by a send under way), new history whatever its date (None: every row, as in a pass stopped part-way)
            until = mark.window_until if resumed and window is not None else None
            window_until = None
            if since is None:  # rows past the mark obey the window (--days N reads its own N days)
                since, window_until = window, until
            # rows above the mark this read leaves out that the next must see: a window narrower than the mark's,
            # or one on the rows past the mark's last row, which obey none
            narrower = since is not None and (window is None or since > window
                                              or (until is not None and window_until is None))
            kept = mark._replace(file_id=current_file) if resumed else Mark(0, current_file, None, window)
            held = False  # once a row must be read again, the mark moves no further in this read
            while not self.stopping.is_set():
                batch = session.read(after, limit=self.settings.batch_size, since_ms=since, window_until=window_until)
                if batch.rows == 0 and batch.last_rowid <= after:
                    break
                if rereading and batch.fanned_out:
                    report.duplicates += self._keep_first_parties(batch)
                items, hints = self._items(batch, report, verdicts)
                # rows a later read must see stop the mark: old ones above it that a window narrower than
                # the mark's left out (they came late), or a message still being sent or dated ahead of the
                # clock (the mark waits just before it)
                dropped = resumed and narrower and batch.skipped[BEFORE_WINDOW] and batch.last_rowid > mark.rowid
                if held or dropped:
                    held = True
                elif batch.unsettled is not None:
                    held = True
                    if kept.rowid < batch.unsettled - 1:  # with its row's anchor (tells a rebuild)
                        kept = Mark(batch.unsettled - 1, current_file, session.anchor(batch.unsettled - 1),
                                    kept.window_ms, kept.window_until)
                elif batch.last_rowid >= floor:  # --full behind the mark keeps it (floor is 0 without one)
                    kept = Mark(batch.last_rowid, current_file, batch.anchor, window, until)
                result = self.store.enqueue(source, items, kept, hints, batch.screened)
                report.rows += batch.rows
                report.added += result.added
                report.duplicates += result.duplicates
                report.skipped.update(batch.skipped)
                if batch.rows:
                    log.info("extract.batch", source=source, rows=batch.rows, added=result.added,
                             mark=batch.last_rowid)
                if progress:
                    progress(batch.rows)
                if batch.last_rowid <= after:
                    break
                after = batch.last_rowid
            # a complete pass: every row has met the window (an empty source keeps no mark: its first rows
            # still get a first sync)
            if kept.window_ms is not None and not held and kept.rowid > 0 and not self.stopping.is_set():
                self.store.enqueue(source, [], kept._replace(window_ms=None, window_until=None))
            # one that read every row but must read some again (a send under way): the window is for the rows
            # there were; those that come later (old history iCloud delivers late) are taken whatever their date
            elif kept.window_ms is not None and held and kept.window_until is None and not self.stopping.is_set():
                self.store.enqueue(source, [], kept._replace(window_until=after))
            if reread and not self.stopping.is_set():  # once: a pass stopped part-way reads again next time
                self.store.reread_done(source)
        report.held = held
        return report

    def _people(self, source: str, parties: list[tuple[str, str | None, str | None]]) -> None:
        """Note which addresses Apple takes for one person, every one the database holds, not only those
        of the rows read: a number whose texts lie outside a `--days` window, and whose call is read,
        shares the placeholder of the same person's email. Written when they change."""
        if not parties or self._people_seen.get(source) == parties:
            return
        hints = {}
        for address, person, country in parties:
            value, is_person = self._counterpart(address, country)
            if is_person and person:
                hints[value] = person
        self.store.remember_hints(hints)
        self._people_seen[source] = parties

    def _keep_first_parties(self, batch: Batch) -> int:
        """A row with several parties that is read again keeps those it was first read with: a group
        chat's members are today's, not the send's, and someone added since never got the message.
        Drops the Activities of rows already in the outbox; returns how many (all known rows)."""
        known = self.store.keys_continued(batch.fanned_out)
        if not known:
            return 0
        prefixes = tuple(f"{shared}:" for shared in known)
        kept = [a for a in batch.activities if not a.key.startswith(prefixes)]
        dropped = len(batch.activities) - len(kept)
        batch.activities = kept
        return dropped

    @staticmethod
    def _replaced(session: SourceReader, mark: Mark, current_file: str) -> bool:
        """Whether the source is no longer the database `mark` was taken in.

        Another file, a mark above every ROWID the database has handed out, or another row at the mark
        (a database deleted and recreated may get the same inode back). Rows merely missing at or below
        the mark were deleted by the owner.
        """
        if (mark.file_id and mark.file_id != current_file) or session.high_water() < mark.rowid:
            return True
        return mark.anchor is not None and session.anchor(mark.rowid) not in (None, mark.anchor)

    def _items(self, batch: Batch, report: SourceReport,
               verdicts: dict[str | tuple[str, str], tuple[str, bool]]) -> tuple[list[NewItem], dict[str, str]]:
        """The batch's Activities as outbox items; counterparts that are not other people are counted as skipped.

        `verdicts` remembers each raw address's `_counterpart` (with its country, if it has one) across
        the batches of one extraction.
        """
        items: list[NewItem] = []
        hints: dict[str, str] = {}
        add, new, skipped, region = items.append, tuple.__new__, report.skipped, self.normalize.region
        for key, address, interaction, occurred_ms, duration_s, person, country in batch.activities:
            seen = address if country is None or country == region else (address, country)
            verdict = verdicts.get(seen)
            if verdict is None:
                verdict = verdicts[seen] = self._counterpart(address, country)
            value, is_person = verdict
            if not is_person:
                skipped[value] += 1
                continue
            add(new(NewItem, (key, value, interaction, occurred_ms, duration_s)))
            if person:
                hints[value] = person
        return items, hints

    def _counterpart(self, raw: str, country: str | None = None) -> tuple[str, bool]:
        """(normalised address, True) for someone else; (why not, False) otherwise."""
        kind, value = self.normalize(raw, country)
        if kind not in PEOPLE:
            return kind, False
        if value in self.owner:
            return "own-address", False
        return value, True
