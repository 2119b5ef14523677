"""`python -m bench [--quick]`: see bench/README.md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import gen, measure as m

HERE = Path(__file__).resolve().parent
console = Console(highlight=False)


def spread(xs) -> dict:
    return {"median": m.med(xs), "min": min(xs) if xs else None, "max": max(xs) if xs else None, "n": len(xs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--quick", action="store_true", help="~1/20 sizes; under a minute")
    args = ap.parse_args(argv)
    q = args.quick
    t_start = time.monotonic()
    big = gen.Spec("quick" if q else "full", 50_000 if q else 1_000_000, 100 if q else 2000, 15 if q else 300,
                   2_500 if q else 50_000, 250 if q else 5_000)
    small = gen.Spec("backfill", 5_000 if q else 100_000, 50 if q else 200, 0, 0, 0)
    live = gen.Spec("live", 40, 20, 0, 0, 0)
    reps = 3
    work = gen.CACHE / ("run-quick" if q else "run")
    say = lambda s: console.print(f"[dim]{time.monotonic() - t_start:6.1f}s[/] {s}")  # noqa: E731
    say("building / loading libraries")
    big_home, small_home, live_home = (gen.build(s, log=say) for s in (big, small, live))

    rows: list[dict] = []

    def row(figure, ours, ours_unit, compared, compared_what, target, met, samples=None, extra=None):
        rows.append({"figure": figure, "ours": ours, "unit": ours_unit, "compared": compared,
                     "compared_with": compared_what,
                     "ratio": (ours["median"] / compared["median"]) if compared and compared.get("median") else None,
                     "target": target, "met": met, "samples": samples, **(extra or {})})

    since = int(time.time() * 1000) - 365 * 86_400_000
    batch = m.settings_for(big_home, work / "s").batch_size
    # 1, 2: extraction vs floor
    for source, floor in (("messages", m.messages_floor), ("calls", m.calls_floor)):
        say(f"extraction: {source}")
        ours, base = [], []
        for r in range(reps):
            secs, n = m.extract_once(big_home, work / "extract", source)
            ours.append(n / secs)
            fsecs, fn = floor(big_home, since, batch)
            base.append(fn / fsecs)
        o, b = spread(ours), spread(base)
        ratio = b["median"] / o["median"]
        row(f"extract {source} ({n:,} rows)", o, "rows/s", b, "reader's SELECT, bare sqlite3", "within 2× of floor",
            ratio <= 2, extra={"slowdown": ratio})
    say("extraction: contacts")
    sqls = m.contacts_floor_sql(big_home)
    ours, base = [], []
    for _ in range(reps):
        secs, n = m.contacts_once(big_home)
        ours.append(n / secs)
        fsecs, _rows = m.contacts_floor(sqls)
        base.append(n / fsecs)
    o, b = spread(ours), spread(base)
    row(f"read contacts ({n:,} cards, 3 stores)", o, "cards/s", b, "same SELECTs, bare sqlite3", "within 2× of floor",
        b["median"] / o["median"] <= 2, extra={"slowdown": b["median"] / o["median"]})

    # 8. contacts_changed
    say("AddressBook rescan (stat only)")
    times = [t * 1000 for t in m.contacts_changed_times(big_home, work / "rescan", 200)]
    o = spread(times)
    row("AddressBook rescan, nothing changed", o, "ms", None, "", "≤ 5 ms", o["median"] <= 5 and o["max"] <= 5)

    # 3. capacity, then backfill
    bf_max = 8 if q else 60
    load_s = 2 if q else 8
    results_bf = {}
    for latency in (0, 40):
        say(f"stand-in capacity, latency {latency} ms")
        conc, seq = [], []
        for r in range(reps):
            with m.procs.Citadel(work / "load.db", latency) as crm:
                ids = m.seed_contacts(crm.url, 50)
                conc.append(m.load_concurrent(crm.url, ids, 100_000, load_s))
                seq.append(m.load_sequential(crm.url, ids, 100_000, load_s / 2))
        say(f"backfill {small.messages:,} interactions, latency {latency} ms")
        runs = [m.backfill(small_home, work / "backfill", latency, small.messages, bf_max) for _ in range(reps)]
        results_bf[latency] = runs
        o, c, s = spread([x["rate"] for x in runs]), spread(conc), spread(seq)
        complete = all(x["completed"] for x in runs)
        note = "" if complete else f" (time-bounded {bf_max}s; delivered {m.med([x['interactions'] for x in runs]):,.0f})"
        row(f"backfill {small.messages:,}, +{latency} ms/request{note}", o, "interactions/s", c,
            "httpx, 8 in flight", "≥ 80% of capacity", o["median"] >= 0.8 * c["median"],
            extra={"runs": runs})
        row(f"  … vs sequential, +{latency} ms", o, "interactions/s", s, "httpx, 1 at a time", "≥ 5× sequential",
            o["median"] >= 5 * s["median"])

    # 4, 5, 6: the daemon
    say("daemon: live latency, burst, idle")
    d = m.daemon_run(live_home, work / "daemon", debounce_ms=100, inserts=50 if q else 200,
                     spacing=(0.15, 0.2), burst=10_000 if not q else 2_000, bursts=reps,
                     idle_windows=reps, idle_s=(10 if q else 60) / reps, log=say)
    lat = sorted(d["latencies_ms"])
    p50 = lat[len(lat) // 2] if lat else float("nan")
    p95 = lat[min(len(lat) - 1, int(len(lat) * 0.95))] if lat else float("nan")
    row(f"live latency p50 ({len(lat)} inserts, lost {d['lost']})", {"median": p50, "min": lat[0] if lat else None,
        "max": lat[-1] if lat else None, "n": len(lat)}, "ms", {"median": d["debounce_ms"]}, "debounce_ms",
        "", None)
    row("live latency p95", {"median": p95, "min": None, "max": None, "n": len(lat)}, "ms",
        {"median": d["debounce_ms"]}, "debounce_ms", "≤ debounce + 150 ms", p95 <= d["debounce_ms"] + 150)
    bf0 = spread([x["rate"] for x in results_bf[0]])
    o = spread([b["rate"] for b in d["bursts"]])
    row(f"burst of {10_000 if not q else 2_000:,} in one transaction", o, "interactions/s", bf0,
        "backfill rate, +0 ms", "within 20%", o["median"] >= 0.8 * bf0["median"],
        extra={"bursts": d["bursts"]})
    window = d["idle_s"]
    per60 = [c * 60 / window for c in d["idle_cpu_s"]]
    o = spread(per60)
    row(f"idle CPU per 60 s ({reps}×{window:.0f}s windows, scaled)", o, "CPU s", None, "", "≤ 0.05 s",
        o["median"] <= 0.05 and sum(d["idle_cpu_s"]) * 60 / (window * reps) <= 0.05)

    # 7. RSS
    rss_small = spread([x["vm_hwm_kb"] / 1024 for x in results_bf[0]])
    say(f"peak RSS over {big.messages:,}-message history")
    big_runs = [m.rss_history(big_home, work / "rss", 30 if q else 150, 2 if q else 10) for _ in range(1)]
    rss_big = spread([x["vm_hwm_kb"] / 1024 for x in big_runs])
    row(f"peak RSS, backfill of {small.messages:,}", rss_small, "MB", None, "", "≤ 100 MB", rss_small["max"] <= 100)
    row(f"peak RSS, {big.messages:,}-message history", rss_big, "MB", rss_small, f"{small.messages:,} backfill",
        "≤ 100 MB, ≈ same", rss_big["max"] <= 100 and rss_big["median"] <= 1.25 * rss_small["median"],
        extra={"runs": big_runs})

    # 9. bytes per delivered interaction
    per = [x["state_bytes"] / x["delivered"] for x in results_bf[0] if x["delivered"]]
    row("state db bytes per delivered interaction", spread(per), "bytes", None, "", "report", None)

    show(rows)
    info = {"nproc": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
            "machine": platform.machine(), "quick": q, "elapsed_s": round(time.monotonic() - t_start, 1),
            "sizes": {"history": big.__dict__, "backfill": small.__dict__}}
    out = HERE / ("results-quick.json" if q else "results.json")
    out.write_text(json.dumps({"machine": info, "rows": rows}, indent=2, default=str))
    say(f"wrote {out.relative_to(HERE.parent)}; machine: {info['nproc']} cores, Python {info['python']}, "
        f"{info['platform']}")
    return 0


def fmt(x, unit="") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and x != x:
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}"


def show(rows: list[dict]) -> None:
    table = Table("figure", "ours (median, min–max)", "compared with (same run)", "ratio", "target", "met?")
    for r in rows:
        o = r["ours"]
        ours = f"{fmt(o['median'])} {r['unit']}"
        if o.get("min") is not None and o.get("n", 0) > 1:
            ours += f" ({fmt(o['min'])}–{fmt(o['max'])})"
        c = r["compared"]
        comp = f"{fmt(c['median'])} {r['compared_with']}" if c else "–"
        if c and c.get("min") is not None:
            comp += f" ({fmt(c['min'])}–{fmt(c['max'])})"
        met = "–" if r["met"] is None else ("[green]yes[/]" if r["met"] else "[red]no[/]")
        table.add_row(r["figure"], ours, comp, fmt(r["ratio"]) if r["ratio"] is not None else "–", r["target"], met)
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
