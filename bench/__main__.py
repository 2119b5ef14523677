"""`python -m bench [--quick] [--profile SOURCE]`: see bench/README.md."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench import gen, measure as m
from crm_syncd.settings import Settings
from tests.harness.processes import sigint_handled

HERE = Path(__file__).resolve().parent
HEARTBEATS = 12  # calls timed: a minute of the daemon's heartbeats
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


@dataclass(frozen=True)
class Plan:
    """Sizes, repetitions and time bounds of one run (full or quick)."""

    history: gen.Spec
    backfill: gen.Spec
    live: gen.Spec
    reps: int  # samples behind every median
    short_reps: int  # samples of the sub-second measurements (calls, contacts): one slow spell skews few of them
    load_s: tuple[float, float]  # capacity: 8-in-flight window, sequential window (per sample)
    bf_window_s: tuple[float, float]  # delivery window of each backfill run, at +0 ms and +40 ms
    bf_max_s: float  # hard bound of each backfill run
    inserts: int  # live latency
    gap_s: tuple[float, float]  # after one insert was delivered, before the next
    burst: int
    behind_s: float  # after each burst's commit, one message of now: its latency behind the burst
    outage_n: int
    outage_hold_s: float
    outage_wait_s: float  # bound on recovery after the stand-in is back
    idle_windows: int
    idle_window_s: float
    history_max_s: float
    history_after_s: float  # delivery seconds the history run goes on for
    bulk_bare: m.BulkShape  # issue 6: the bare bulk import
    bulk_shapes: tuple[m.BulkShape, ...]  # the bulk import as crm-syncd would have to use it
    bulk_max_s: float  # bound of each bulk run


FULL = Plan(
    history=gen.Spec("full", 1_000_000, 2000, 300, 50_000, 5_000),
    backfill=gen.Spec("backfill", 100_000, 50, 0, 0, 0),
    live=gen.Spec("live", 40, 20, 0, 0, 0),
    reps=3, short_reps=15, load_s=(2.0, 1.5), bf_window_s=(8.0, 6.0), bf_max_s=60.0,
    inserts=200, gap_s=(0.05, 0.1), burst=10_000, behind_s=1.0,
    outage_n=2_000, outage_hold_s=5.0, outage_wait_s=120.0,
    idle_windows=3, idle_window_s=22.0,  # 66 s: the 60-s timers come every 60-65 s (on the 5-s tick)
    history_max_s=300.0, history_after_s=3.0,
    bulk_bare=m.BulkShape("bare", 20, 5, 120),
    bulk_shapes=(m.BulkShape("dense", 20, 5, 120), m.BulkShape("sparse", 200, 5, 2)),
    bulk_max_s=30.0,
)
QUICK = Plan(
    history=gen.Spec("quick", 50_000, 40, 15, 2_500, 250),
    backfill=gen.Spec("backfill", 5_000, 10, 0, 0, 0),
    live=gen.Spec("live", 40, 20, 0, 0, 0),
    reps=3, short_reps=5, load_s=(0.6, 0.4), bf_window_s=(1.0, 1.0), bf_max_s=15.0,
    inserts=20, gap_s=(0.05, 0.1), burst=500, behind_s=0.1,
    outage_n=500, outage_hold_s=1.5, outage_wait_s=3.0,
    idle_windows=3, idle_window_s=2.0,
    history_max_s=60.0, history_after_s=1.0,
    bulk_bare=m.BulkShape("bare", 10, 1, 120),
    bulk_shapes=(m.BulkShape("dense", 10, 1, 120), m.BulkShape("sparse", 50, 2, 2)),
    bulk_max_s=10.0,
)


def spread(xs) -> dict:
    return {"median": m.med(xs), "min": min(xs) if xs else None, "max": max(xs) if xs else None, "n": len(xs)}


def one(x, n: int = 1) -> dict:
    """A single figure (no median: one run, or one window that is itself the figure)."""
    return {"median": x, "min": None, "max": None, "n": n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--quick", action="store_true", help="~1/20 sizes; under a minute")
    ap.add_argument("--profile", choices=m.PROFILED,
                    help="instead of measuring: profile one in-process read of this source of the history "
                         "Library with pyinstrument (call tree printed, HTML saved)")
    args = ap.parse_args(argv)
    q = args.quick
    p = QUICK if q else FULL
    quiet_logs()
    sigint_handled()  # the backfill syncs are stopped with SIGINT
    gc.freeze()  # as crm-syncd's CLI does before a command: the in-process rows run like it
    t_start = time.monotonic()
    work = gen.CACHE / ("run-quick" if q else "run")
    say = lambda s: console.print(f"[dim]{time.monotonic() - t_start:6.1f}s[/] {s}")  # noqa: E731
    if args.profile:
        profile(args.profile, p.history, work, say)
        return 0
    phases: dict[str, float] = {}

    @contextmanager
    def phase(name: str):
        say(name)
        t = time.monotonic()
        try:
            yield
        finally:
            phases[name] = round(time.monotonic() - t, 1)

    rows: list[dict] = []

    def row(figure, ours, ours_unit, compared, compared_what, target, met, **extra):
        rows.append({"figure": figure, "ours": ours, "unit": ours_unit, "compared": compared,
                     "compared_with": compared_what,
                     "ratio": (ours["median"] / compared["median"])
                     if compared and compared.get("median") and ours.get("median") is not None else None,
                     "target": target, "met": met, **extra})

    with phase("libraries (built if not cached)"):
        big_home, small_home, live_home = (gen.build(s, log=say) for s in (p.history, p.backfill, p.live))

    since = int(time.time() * 1000) - 365 * 86_400_000
    batch = m.settings_for(big_home, work / "s").batch_size

    # 1, 2: extraction in-process on a fresh state db, each run next to its floors
    with phase("extraction: messages, calls, contacts; floors"):
        msgs, msg_floor, msg_write_floor, msg_sql_floor = [], [], [], []
        for _ in range(p.reps):
            secs, n_msgs = m.extract_once(big_home, work / "extract", "messages")
            msgs.append(n_msgs / secs)
            fsecs, fn = m.messages_floor(big_home, since, batch)
            msg_floor.append(fn / fsecs)
            fsecs, fn = m.messages_floor(big_home, since, batch, into=work / "floor.db")
            msg_write_floor.append(fn / fsecs)
            fsecs, fn = m.messages_sql_floor(big_home, since, batch, work / "sql-floor.db")
            msg_sql_floor.append(fn / fsecs)
        calls, calls_floor = [], []
        for _ in range(p.short_reps):
            secs, n_calls = m.extract_once(big_home, work / "extract", "calls")
            calls.append(n_calls / secs)
            fsecs, fn = m.calls_floor(big_home, since, batch)
            calls_floor.append(fn / fsecs)
        sqls = m.contacts_floor_sql(big_home)
        cards, cards_floor = [], []
        for _ in range(p.short_reps):
            secs, n_cards = m.contacts_once(big_home)
            cards.append(n_cards / secs)
            fsecs, _rows = m.contacts_floor(sqls)
            cards_floor.append(n_cards / fsecs)

    # 8. contacts_changed
    with phase("AddressBook rescan (stat only)"):
        rescan = [t * 1000 for t in m.contacts_changed_times(big_home, work / "rescan", 200)]

    # 3. capacity, then backfill (one stand-in process per latency)
    cap, bf = {}, {}
    for latency, window in zip((0, 40), p.bf_window_s):
        with phase(f"+{latency} ms: stand-in capacity ({p.reps} × {p.load_s[0]:g} s + {p.load_s[1]:g} s), "
                   f"{p.reps} backfills of {p.backfill.messages:,} ({window:g} s of delivery each)"):
            cap[latency] = m.capacity_and_backfills(small_home, work / f"backfill{latency}", latency, p.reps, p.load_s,
                                                    p.backfill.messages, window, p.bf_max_s,
                                                    first_n=p.outage_n if latency == 0 else 0)
            bf[latency] = cap[latency].pop("runs")

    # 11. issue 6: the bulk import, bare and as crm-syncd would have to use it, vs single POSTs
    shapes = "; ".join(f"{s.name} {s.contacts} × {s.days} d × {s.per_day}" for s in p.bulk_shapes)
    with phase(f"bulk import vs single POSTs: {p.reps} × (capacity {p.load_s[0]:g} s, bare bulk of "
               f"{p.bulk_bare.rows:,} rows, the procedure: {shapes})"):
        bulk = m.bulk_vs_single(work / "bulk", p.reps, p.load_s[0], p.bulk_bare, p.bulk_shapes, p.bulk_max_s)

    # 4, 5, 6, 10 (the daemon); 7 and the messages extraction (the history sync) during its idle window
    with phase("daemon: start, catch-up"):
        daemon = m.Daemon(live_home, work / "daemon", debounce_ms=Settings.model_fields["debounce_ms"].default)
    recovered = True
    try:
        with phase(f"daemon: live latency ({p.inserts} inserts)"):
            live = daemon.latency(p.inserts, p.gap_s)
        with phase(f"daemon: {p.reps} bursts of {p.burst:,}"):
            bursts = daemon.bursts(p.burst, p.reps, p.behind_s)
        time.sleep(1.0)
        with phase(f"history sync ({p.history.messages:,} messages: extraction, peak RSS), "
                   f"daemon idle meanwhile ({p.idle_windows} × {p.idle_window_s:g} s)"):
            idle = m.IdleSampler(daemon.pid, p.idle_windows, p.idle_window_s)
            t_idle = time.time() * 1000
            idle.start()
            hist = m.history_sync(big_home, work / "history", p.history_max_s, p.history_after_s)
            idle.join()
            idle_events = daemon.events_between(t_idle, time.time() * 1000)
        with phase("the daemon's heartbeat on the history sync's state db"):
            beat = m.heartbeat_times(Path(hist["state_db"]), HEARTBEATS)
        with phase(f"daemon: CRM outage, {p.outage_n:,} queued, recovery (bound {p.outage_wait_s:g} s)"):
            outage = daemon.outage(p.outage_n, p.outage_hold_s, p.outage_wait_s)
            recovered = outage["recovered"]
    finally:
        daemon.close(wait=15.0 if recovered else 2.0)  # still backing off: no need to wait for a clean stop
    daemon_state = daemon.state_size()

    # -- rows ------------------------------------------------------------------------------------
    o, b, w, sql, h = spread(msgs), spread(msg_floor), spread(msg_write_floor), spread(msg_sql_floor), hist["messages"]
    row(f"extract messages ({n_msgs:,} rows)", o, "rows/s", b, "reader's SELECT, bare sqlite3", "within 2× of floor",
        b["median"] / o["median"] <= 2, slowdown=b["median"] / o["median"],
        note=f"the same SELECT also writing its rows as they are into an unindexed table (one transaction per "
             f"page): {w['median']:,.0f} rows/s, {w['median'] / o['median']:.1f}× ours; moved by SQLite alone into "
             f"crm-syncd's outbox (its schema and indexes, no Python per row): {sql['median']:,.0f} rows/s, "
             f"{b['median'] / sql['median']:.2f}× the bare SELECT's time. In the history sync (the "
             f"CLI, 1 run): {h['rate']:,.0f} rows/s, by thirds of the rows "
             f"{', '.join(f'{r:,.0f}' for r in h['parts'])}",
        samples={"ours": msgs, "floor": msg_floor, "write_floor": msg_write_floor,
                 "sql_write_floor": msg_sql_floor, "history_sync": h})
    o, b = spread(calls), spread(calls_floor)
    row(f"extract calls ({n_calls:,} rows)", o, "rows/s", b, "reader's SELECT, bare sqlite3", "within 2× of floor",
        b["median"] / o["median"] <= 2, slowdown=b["median"] / o["median"], samples={"ours": calls, "floor": calls_floor})
    o, b = spread(cards), spread(cards_floor)
    row(f"read contacts ({n_cards:,} cards, 3 stores)", o, "cards/s", b, "same SELECTs, bare sqlite3",
        "within 2× of floor", b["median"] / o["median"] <= 2, slowdown=b["median"] / o["median"],
        samples={"ours": cards, "floor": cards_floor})
    o = spread(rescan)
    row("AddressBook rescan, nothing changed (200 calls)", o, "ms", None, "", "≤ 5 ms", o["median"] <= 5 and o["max"] <= 5)

    for latency in (0, 40):
        runs = bf[latency]
        o, c, s = spread([x["rate"] for x in runs]), spread(cap[latency]["concurrent"]), \
            spread(cap[latency]["sequential"])
        complete = all(x["completed"] for x in runs)
        window = p.bf_window_s[0 if latency == 0 else 1]
        what = "" if complete else (f" (first {window:g} s of delivery; "
                                    f"{m.med([x['interactions'] for x in runs]):,.0f} delivered)")
        row(f"backfill {p.backfill.messages:,}, +{latency} ms/request{what}", o, "interactions/s", c,
            "httpx, 8 in flight", "≥ 80% of capacity", o["median"] >= 0.8 * c["median"], runs=runs,
            samples=cap[latency])
        r = spread([x["rate"] for x in cap[latency]["raw"]])
        busy = m.med([x["server_core_share"] for x in cap[latency]["raw"]])
        row(f"  … vs the stand-in's own capacity, +{latency} ms", o, "interactions/s", r,
            "lean client, 8 in flight", "report", None,
            note=f"HTTP/1.1 by hand on 8 keep-alive connections, no httpx: the stand-in process used {busy:.0%} of "
                 f"a core meanwhile; the httpx load generator above reached {c['median'] / r['median']:.2f} of it")
        extra = {}
        if (top := max(c["median"], r["median"])) < 5 * s["median"]:
            extra["bound"] = (f"the stand-in's capacity / sequential = {top / s['median']:.2f}×, so 5× is "
                              f"unreachable at +{latency} ms")
        row(f"  … vs sequential, +{latency} ms", o, "interactions/s", s, "httpx, 1 at a time", "≥ 5× sequential",
            o["median"] >= 5 * s["median"], **extra)

    lat = sorted(live["latencies_ms"])
    lost = live["lost"]
    ranked = lat + [float("inf")] * lost  # a message lost (not in the CRM within the bound) is the slowest of all
    p50, p95 = ranked[len(ranked) // 2], ranked[min(len(ranked) - 1, int(len(ranked) * 0.95))]
    inserts = f"{len(ranked)} inserts, lost {lost} (not in the CRM within {live['bound_s']:g} s)"
    row(f"live latency p50 ({inserts})",
        {"median": p50, "min": ranked[0], "max": ranked[-1], "n": len(ranked)}, "ms",
        {"median": daemon.debounce_ms}, "debounce_ms (the default)", "", None, samples=lat)
    row(f"live latency p95 ({inserts})", one(p95, len(ranked)), "ms", {"median": daemon.debounce_ms},
        "debounce_ms (the default)", "≤ debounce + 150 ms", p95 <= daemon.debounce_ms + 150 and not lost)
    bf0 = spread([x["rate"] for x in bf[0]])
    o = spread([b["rate"] for b in bursts])
    row(f"burst of {p.burst:,} in one transaction", o, "interactions/s", bf0, "backfill rate, +0 ms", "within 20%",
        o["median"] >= 0.8 * bf0["median"], bursts=bursts)
    behind = [b["behind_latency_ms"] for b in bursts if b["behind_latency_ms"] is not None]
    left = m.med([b["burst_left_ms"] for b in bursts])
    row(f"  … a message of now, {p.behind_s:g} s into each burst: latency ({len(behind)} of {len(bursts)} seen)",
        spread(behind), "ms", {"median": daemon.debounce_ms}, "debounce_ms", "report", None,
        note=f"the burst's last delivery came {left:,.0f} ms after that message's commit (median)")

    # 10. recovery after a CRM outage
    plain = [x["first_n_s"] for x in bf[0] if x.get("first_n_s") is not None]
    pl = spread(plain) if plain else None
    cpu = outage["daemon_cpu"]
    waiting = cpu["up_to_first"]
    bounded = "" if outage["recovered"] else f"; {outage['delivered']:,} of them within the {p.outage_wait_s:g}-s bound"
    row(f"recovery after a CRM outage ({outage['down_s']:.1f} s down, {p.outage_n:,} queued; 1 outage{bounded}): "
        "back up → last delivered", one(outage["to_last_s"]), "s", pl,
        f"plain backfill of {p.outage_n:,} (first → {p.outage_n:,}th, +0 ms)", "report", None, outage=outage,
        note=f"back up → first delivered: the daemon used {waiting['cpu_s'] * 1000:.0f} ms CPU in those "
             f"{waiting['seconds']:.1f} s; daemon log events from down to done: {outage['daemon_events'] or 'none'}")
    row("  … back up → first delivered", one(outage["to_first_s"]), "s", None, "", "report", None)
    row("  … missing / duplicated (stand-in rows vs expected)",
        one(f"{outage['missing']} / {outage['duplicates']}"), "", None, "", "0 / 0",
        (outage["missing"] == 0 and outage["duplicates"] == 0 and outage["duplicates_whole_run"] == 0)
        if outage["recovered"] else None,
        note=("" if outage["recovered"] else "not all had arrived when the bound ran out: 'missing' counts those; ")
        + f"{outage['unexpected']} unexpected rows; duplicates (same contact, type, occurredAt) over the whole "
          f"daemon run: {outage['duplicates_whole_run']}")

    # 6. idle
    total = idle.total or {}
    scale = max(1.0, 60 / (p.idle_windows * p.idle_window_s))  # a window over 60 s counts whole: the stricter
    per60 = total.get("cpu_s", float("nan")) * scale
    windows = [w["cpu_s"] for w in idle.samples]
    row(f"idle CPU over {p.idle_windows * p.idle_window_s:g} s" + (", scaled to 60 s" if scale != 1 else ""),
        one(per60), "CPU s", None, "", "≤ 0.05 s", per60 <= 0.05,
        note=f"windows of {p.idle_window_s:g} s: {', '.join(f'{w * 1000:.1f}' for w in windows)} ms CPU; "
             f"{'ns-precise (schedstat)' if total.get('precise') else '10-ms ticks'}; "
             f"daemon log events meanwhile: {idle_events or 'none'}"
             + ("" if scale == 1 else "; a quick window misses the 60-s timers (probe, AddressBook rescan)"),
        windows=idle.samples, total=total)

    # 6b. what the heartbeat costs once the history is in the outbox
    from crm_syncd import daemon as daemon_module
    every = getattr(daemon_module, "HEARTBEAT_S", 5.0)
    per_call = spread([t * 1000 for t in beat["cpu_seconds"]])
    wall = spread([t * 1000 for t in beat["seconds"]])
    outbox = beat["outbox_rows"]
    per_min = per_call["median"] / 1000 * 60 / every
    row(f"idle CPU with the {p.history.messages:,}-message history in the outbox, projected: "
        f"one heartbeat × {60 / every:g}/min", one(per_min), "CPU s", None, "", "≤ 0.05 s",
        per_min <= 0.05, heartbeat=beat,
        note=f"Daemon.beat() + failed count on the history sync's state db ({outbox:,} outbox rows): "
             f"{fmt(per_call['median'])} ms of CPU "
             f"({fmt(per_call['min'])}–{fmt(per_call['max'])}, {per_call['n']} calls), {fmt(wall['median'])} ms "
             f"wall with the fsync of its commit; the daemon calls it every {every:g} s, idle or not. The idle "
             f"row above was measured with {daemon_state['rows']:,} outbox rows")

    # 7. RSS
    rss_small = spread([x["vm_hwm_kb"] / 1024 for x in bf[0] + bf[40]])
    rss_big = one(hist["vm_hwm_kb"] / 1024)
    row(f"peak RSS, backfill of {p.backfill.messages:,} ({len(bf[0]) + len(bf[40])} runs)", rss_small, "MB", None,
        "", "≤ 100 MB", rss_small["max"] <= 100)
    reached = "" if hist["reached_delivery"] else f", delivery not reached within {p.history_max_s:g} s"
    by_phase = ", ".join(f"{k} {v:.1f}" for k, v in hist["peak_rss_mb_by_phase"].items())
    row(f"peak RSS, {p.history.messages:,}-message history (1 run{reached})", rss_big, "MB", rss_small,
        f"{p.backfill.messages:,} backfill", "≤ 100 MB, ≈ same (≤ 1.25×)",
        rss_big["median"] <= 100 and rss_big["median"] <= 1.25 * rss_small["median"], history=hist,
        note=f"highest VmRSS seen by phase (polled every 0.2 s): {by_phase} MB; first delivery after "
             f"{hist['to_first_delivery_s'] or float('nan'):.0f} s")

    # 9. state db bytes per interaction: the daemon's (everything delivered, in the full run), and the
    # backfill runs' (all 100,000 extracted, a few thousand delivered: per outbox row)
    per_bf = [x["state_bytes"] / x["outbox_rows"] for x in bf[0] + bf[40] if x["outbox_rows"]]
    ds = daemon_state
    row(f"state db bytes per interaction (the daemon's: {ds['rows']:,} outbox rows, {ds['delivered']:,} delivered)",
        one(ds["bytes"] / ds["rows"] if ds["rows"] else float("nan")), "bytes", spread(per_bf),
        f"backfill runs' state, per outbox row ({p.backfill.messages:,}, mostly pending)", "report", None,
        daemon_state=ds)

    # 11. issue 6: the bulk import
    bulk_rows(row, p, bulk)

    show(rows)
    info = {"nproc": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
            "machine": platform.machine(), "quick": q, "elapsed_s": round(time.monotonic() - t_start, 1),
            "phases_s": phases, "plan": dataclasses.asdict(p)}
    out = HERE / ("results-quick.json" if q else "results.json")
    out.write_text(json.dumps({"machine": info, "rows": rows}, indent=2, default=str))
    console.print("wall time by phase: " + "; ".join(f"{k} {v:.0f} s" for k, v in phases.items()))
    say(f"wrote {out.relative_to(HERE.parent)}; machine: {info['nproc']} cores, Python {info['python']}, "
        f"{info['platform']}")
    return 0


def bulk_rows(row, p: Plan, bulk: dict) -> None:
    """Issue 6: is the bulk import worth it? Stand-in figures, and the same requests at the contract's
    real-server rates."""
    cap = spread(bulk["concurrent"])
    real = m.REAL
    bare = bulk[p.bulk_bare.name]
    o = spread([x["rate"] for x in bare])
    cut = "" if all(x["completed"] for x in bare) else f"; cut by the {p.bulk_max_s:g}-s bound"
    row(f"bulk import, bare ({p.bulk_bare.rows:,} rows in batches of {m.BULK_BATCH}, {p.bulk_bare.contacts} contacts "
        f"with unique emails{cut})", o, "rows/s", cap, "single POSTs, httpx 8 in flight", "report", None,
        runs=bare, samples=bulk["concurrent"],
        note=f"bare bulk ÷ single POSTs in the stand-in: {o['median'] / cap['median']:.0f}×; on the real server "
             f"(contract): ~{real['bulk_rows_s']:.0f} rows/s vs ~{real['single_s']:.0f}/s = "
             f"{real['bulk_rows_s'] / real['single_s']:.1f}×. The stand-in takes ~{1e6 / o['median']:.0f} µs "
             f"per bulk row (HTTP and JSON included), the real server ~{1e3 / real['bulk_rows_s']:.1f} ms. "
             f"Not timed: after the bulk alone, lastContactedAt was still unset on {sum(x['stale'] for x in bare)} of "
             f"{sum(x['with_outbound'] for x in bare)} contacts with outbound rows (no recompute, as the contract "
             f"says)")
    right = total = stale = with_out = inbound = 0
    for shape in p.bulk_shapes:
        runs = bulk[shape.name]
        x = runs[0]
        o = spread([r["rate"] for r in runs])
        learned, expected = (sum(r["listings"][k] for r in runs) for k in ("ids_learned", "ids_expected"))
        cut = "" if all(r["completed"] for r in runs) else f"; cut by the {p.bulk_max_s:g}-s bound"
        row(f"bulk as crm-syncd would use it, {shape.name}: {shape.contacts} contacts × {shape.days} day{'s' if shape.days != 1 else ''} × "
            f"{shape.per_day} rows ({x['bulk']['requests']} bulk + {x['listings']['requests']:,} day listings + "
            f"{x['singles']['requests']} single POSTs{cut})", o, "rows/s", cap, "single POSTs, httpx 8 in flight",
            "report", None, runs=runs,
            note=f"{shape.name}, stand-in, median seconds: bulk {m.med([r['bulk']['seconds'] for r in runs]):.2f}, "
                 f"listings {m.med([r['listings']['seconds'] for r in runs]):.2f} "
                 f"({m.med([r['listings']['requests'] / r['listings']['seconds'] for r in runs]):,.0f}/s), "
                 f"singles {m.med([r['singles']['seconds'] for r in runs]):.2f}; ids learned "
                 f"{learned:,} of {expected:,} bulk rows ({sum(r['listings']['foreign_rows'] for r in runs)} "
                 f"foreign rows, {sum(r['listings']['short_days'] for r in runs)} days short of meta.total)")
        proj = m.real_projection(x)
        half = m.real_projection(x, 2 * real["single_s"])
        row(f"  … {shape.name}, projected on the real server (same requests at the contract's rates)",
            one(proj["rate"]), "rows/s", {"median": real["single_s"]}, "contract: single POST, 8 in flight",
            "report", None, projection=proj,
            note=f"{shape.name}: {x['bulk']['rows']:,} bulk rows at {real['bulk_rows_s']:.0f}/s + "
                 f"{x['listings']['requests']:,} listings and {x['singles']['requests']} single POSTs at "
                 f"{real['single_s']:.0f}/s (the contract has no rate for a day listing: assumed as dear as a POST) = "
                 f"{proj['seconds']:.1f} s for {x['rows']:,} rows; with listings at twice that rate: "
                 f"{half['rate']:.0f} rows/s ({half['rate'] / real['single_s']:.2f}×)")
        right += sum(r["last_contacted_right"] for r in runs)
        total += sum(r["contacts"] for r in runs)
        stale += sum(r["stale_after_bulk"] for r in runs)
        with_out += sum(r["with_outbound_bulk"] for r in runs)
        inbound += sum(r["newest_inbound"] for r in runs)
    row("  … lastContactedAt = newest outbound interaction, after the procedure (every contact, every run)",
        one(f"{right:,} of {total:,}"), "", None, "", "all", right == total,
        note=f"checked through GET /api/contacts on the stand-in. After the bulk step alone (before the single "
             f"POSTs) {stale:,} of {with_out:,} contacts with outbound bulk rows had a stale lastContactedAt (the "
             f"stand-in does not recompute on a bulk import, like the contract); {inbound:,} contacts' newest "
             f"interaction was inbound: their lastContactedAt came from a bulk row, through the single POST's full "
             f"recompute")


def profile(source: str, spec: gen.Spec, work: Path, say) -> Path:
    """Profile one in-process read of `source` of the `spec` Library; print its call tree, save its HTML."""
    home = gen.build(spec, log=say)
    say(f"profiling the {source} read of {home.name} with pyinstrument")
    profiler = m.profiled(home, work / "profile", source)
    html = work / f"profile-{source}.html"
    html.parent.mkdir(parents=True, exist_ok=True)
    html.write_text(profiler.output_html())
    sys.stdout.write(profiler.output_text(unicode=True, color=sys.stdout.isatty()))
    say(f"wrote {html}")
    return html


def quiet_logs() -> None:
    """crm_syncd's loggers in this process (the in-process extractions) at warning level."""
    from crm_syncd import logs

    logs.configure(console=False)
    logging.getLogger("crm_syncd").setLevel(logging.WARNING)


def fmt(x, unit="") -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and x != x:
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if 0 < abs(x) < 0.1:
        return f"{x:.3f}"
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}"


def show(rows: list[dict]) -> None:
    table = Table("figure", "ours (median, min–max)", "compared with (same run)", "ratio", "target", "met?")
    notes = []
    for r in rows:
        o = r["ours"]
        ours = f"{fmt(o['median'])} {r['unit']}".strip()
        if o.get("min") is not None and o.get("n", 0) > 1:
            ours += f" ({fmt(o['min'])}–{fmt(o['max'])})"
        c = r["compared"]
        comp = f"{fmt(c['median'])} {r['compared_with']}" if c else "–"
        if c and c.get("min") is not None:
            comp += f" ({fmt(c['min'])}–{fmt(c['max'])})"
        met = "–" if r["met"] is None else ("[green]yes[/]" if r["met"] else "[red]no[/]")
        for key in ("bound", "note"):
            if r.get(key):
                notes.append(r[key])
                met += escape(f" [{len(notes)}]")
        table.add_row(r["figure"], ours, comp, fmt(r["ratio"]) if r["ratio"] is not None else "–", r["target"], met)
    console.print(table)
    for i, text in enumerate(notes, 1):
        console.print(f"[{i}] {text}", markup=False)


if __name__ == "__main__":
    sys.exit(main())
