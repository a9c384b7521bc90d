#!/usr/bin/env python3
"""Generate Debezium-style PostgreSQL change events (NDJSON) with duplicates.

The stream starts like a real connector's: an initial snapshot whose rows
(`op = "r"`) all share one `source.lsn` and `source.txId`, as every
snapshot does, then streamed transactions of 1..4 row changes each.
Duplicates look like what a real pipeline sees after a connector restart or
a consumer rebalance: a run of earlier events delivered again, byte-different
in the envelope (`ts_ms` is the redelivery time) but otherwise the same.
Position and table alone do not identify a snapshot row: use
`seen filter --id debezium`. Deterministic for a given seed.

    python3 examples/gen_debezium.py --events 20000 --dup-rate 0.25 > examples/debezium-sample.ndjson
"""
import argparse
import json
import random
import sys


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=20000, help="lines to write, duplicates included")
    p.add_argument("--dup-rate", type=float, default=0.25, help="fraction of lines that are redeliveries")
    p.add_argument("--snapshot-rows", type=int, default=400, help="rows in the initial snapshot")
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args()
    rng = random.Random(a.seed)
    tables = ["orders", "customers", "payments", "shipments"]
    emitted = []  # (source, op, before, after)
    lsn = 24_023_128
    tx = 5_000
    ts = 1_732_000_000_000
    out = sys.stdout
    lines = 0
    dups = 0
    next_id = {t: 1 for t in tables}
    # The initial snapshot: one position, one transaction, many rows.
    tx += 1
    for i in range(min(a.snapshot_rows, a.events)):
        table = tables[i % len(tables)]
        row = next_id[table]
        next_id[table] += 1
        data = {"id": row, "status": rng.choice(["new", "paid", "sent", "done"]), "amount": rng.randint(1, 99999) / 100}
        flag = "first" if i == 0 else ("last" if i == a.snapshot_rows - 1 else "true")
        source = {
            "version": "2.7.0.Final", "connector": "postgresql", "name": "shop",
            "ts_ms": ts, "snapshot": flag, "db": "shop", "schema": "public", "table": table,
            "txId": tx, "lsn": lsn,
        }
        ev = (source, "r", None, data)
        emitted.append(ev)
        ts += 1
        out.write(envelope(ev, ts))
        lines += 1
    while lines < a.events:
        if emitted and dups < a.dup_rate * lines and rng.random() < 0.1:
            # A redelivered run: replay 1..50 consecutive earlier events,
            # mostly recent ones (a rebalance rewinds to the last commit).
            start = max(0, len(emitted) - rng.randint(1, 2000))
            for ev in emitted[start : start + rng.randint(1, 50)]:
                if lines >= a.events:
                    break
                ts += rng.randint(1, 5)
                out.write(envelope(ev, ts))
                lines += 1
                dups += 1
            continue
        # A new transaction with 1..4 row changes.
        tx += 1
        for _ in range(rng.randint(1, 4)):
            if lines >= a.events:
                break
            table = rng.choice(tables)
            lsn += rng.randint(40, 400)
            ts += rng.randint(1, 20)
            op = rng.choices("cud", weights=[6, 3, 1])[0]
            row = next_id[table] if op == "c" else rng.randint(1, max(1, next_id[table] - 1))
            if op == "c":
                next_id[table] += 1
            data = {"id": row, "status": rng.choice(["new", "paid", "sent", "done"]), "amount": rng.randint(1, 99999) / 100}
            before = None if op == "c" else dict(data, status="new")
            after = None if op == "d" else data
            source = {
                "version": "2.7.0.Final", "connector": "postgresql", "name": "shop",
                "ts_ms": ts - 3, "snapshot": "false", "db": "shop", "schema": "public",
                "table": table, "txId": tx, "lsn": lsn,
            }
            ev = (source, op, before, after)
            emitted.append(ev)
            out.write(envelope(ev, ts))
            lines += 1


def envelope(ev, ts):
    source, op, before, after = ev
    return json.dumps({"before": before, "after": after, "source": source, "op": op, "ts_ms": ts}, separators=(",", ":")) + "\n"


if __name__ == "__main__":
    main()
