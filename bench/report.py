"""Medians over the rounds, the issue's floors, and the outputs: JSON, markdown, chart."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, TypeGuard

from bench.targets import PEERS, TARGETS

Result = dict[str, Any]
Summary = dict[str, dict[str, Any]]  # target key -> metric -> median
OURS = "mmproxy"  # as the CLI runs it; the pinned variant is shown beside it
OURS_VARIANTS = (OURS, "mmproxy-pinned")


def summarize(runs: list[Result]) -> Summary:
    """Per target, the median of every numeric metric over the rounds that produced it."""
    values: dict[str, dict[str, list[Any]]] = {}
    for run in runs:
        per_target = values.setdefault(run["target"], {})
        for metric, value in run.get("metrics", {}).items():
            per_target.setdefault(metric, []).append(value)
    return {target: _medians(metrics) for target, metrics in values.items()}


def _medians(metrics: dict[str, list[Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric, vals in metrics.items():
        present = [v for v in vals if v is not None]
        if metric == "gateway_exit":
            out[metric] = _exits(vals)
        elif not present:
            out[metric] = None
        elif all(isinstance(v, bool) for v in present):
            out[metric] = all(present)
        elif all(isinstance(v, int | float) for v in present):
            out[metric] = round(statistics.median(present), 3)
        else:
            out[metric] = present[-1]
    return out


def _exits(statuses: list[int | None]) -> str:
    """How often the gateway exited by itself during the workload, and how."""
    exited = [s for s in statuses if s is not None]
    if not exited:
        return "no"
    how = ", ".join(sorted({f"status {s}" for s in exited}))
    return f"{len(exited)} of {len(statuses)} rounds ({how})"


# --- floors --------------------------------------------------------------------------


@dataclass(frozen=True)
class Floor:
    """mmproxy's figure over the best peer's (or one peer's) must stay within factor."""

    label: str
    metric: str
    higher_is_better: bool
    factor: float
    peers: tuple[str, ...] = PEERS
    peer_metric: str = ""  # the peers' metric, if another than ours (UDP: v2's)

    @property
    def compared_with(self) -> str:
        return self.peer_metric or self.metric


RATE_NAMES = {"v1": "PROXY v1", "v2": "PROXY v2"}
FAMILY_NAMES = {"ipv4": "IPv4", "ipv6": "IPv6"}
DIGITS = {"conn_per_s": 0, "cpu_s_per_1k_conn": 3, "held": 0, "alive": 0, "udp_pps": 0,
          "udp_cpu_s_per_mpkt": 2, "udp_p99_ms": 3}  # fmt: skip
RSS_PER_CONN_MAX_KIB = 1.0
FDS_PER_CONN_MAX = 2.05  # two, allowing for the few pooled pipes
COLD_START_METRIC = "cold_ms_median"  # bench/coldstart.py: a round's median cold start
COLD_START_MAX_MS = 150.0
UDP_PEER = "go-mmproxy"


def rate_metric(name: str, proxy: str, family: str) -> str:
    """The rate test's metric name for a variant (as bench.workloads.rate_metric)."""
    return name + ("_v2" if proxy == "v2" else "") + ("_ipv6" if family == "ipv6" else "")


def udp_metric(name: str, framing: str, size: int) -> str:
    """The UDP workload's metric name (as bench.udp._metric)."""
    return f"{name}_{size}" if framing in ("v2", "none") else f"{name}_{framing}_{size}"


def bulk_floors() -> list[Floor]:
    return [
        Floor("bulk: upload throughput ≥ 1.0 x best peer", "upload_gbit_s", True, 1.0),
        Floor("bulk: download throughput ≥ 1.0 x best peer", "download_gbit_s", True, 1.0),
        Floor("bulk: gateway CPU per GiB ≤ 0.8 x best peer", "cpu_s_per_gib", False, 0.8),
    ]


def rate_floors(variants: list[str]) -> list[Floor]:
    floors = []
    for variant in variants:
        proxy, _, family = variant.partition("-")
        where = f"rate, {RATE_NAMES[proxy]}, {FAMILY_NAMES[family]}"
        floors += [
            Floor(f"{where}: gateway CPU per 1,000 connections ≤ 1.0 x best peer",
                  rate_metric("cpu_s_per_1k_conn", proxy, family), False, 1.0),
            Floor(f"{where}: connections/s ≥ 1.0 x best peer",
                  rate_metric("conn_per_s", proxy, family), True, 1.0),
            Floor(f"{where}: p99 latency ≤ 1.0 x best peer",
                  rate_metric("p99_ms", proxy, family), False, 1.0),
        ]  # fmt: skip
    return floors


def udp_floors(framings: list[str], sizes: list[int]) -> list[Floor]:
    """Against go-mmproxy's figure with v2 in every datagram (all it does)."""
    floors = []
    for size in sizes:
        for framing in framings:
            where = f"UDP {framing}, {size} B"
            for name, higher, factor, text in (
                ("udp_pps", True, 2.0, "pairs/s ≥ 2.0 x"),
                ("udp_cpu_s_per_mpkt", False, 0.5, "CPU per pair ≤ 0.5 x"),
                ("udp_p99_ms", False, 1.0, "p99 ≤ 1.0 x"),
            ):
                ours, theirs = udp_metric(name, framing, size), udp_metric(name, "v2", size)
                label = f"{where}: {text} {UDP_PEER}"
                floors.append(Floor(label, ours, higher, factor, (UDP_PEER,), theirs))
    return floors


def best_peer(summary: Summary, floor: Floor) -> tuple[str, float] | None:
    found = [
        (key, summary[key][floor.compared_with])
        for key in floor.peers
        if key in summary and _number(summary[key].get(floor.compared_with))
    ]
    if not found:
        return None
    pick = max if floor.higher_is_better else min
    return pick(found, key=lambda kv: kv[1])


def _number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def all_floors(summary: Summary, settings: dict[str, Any]) -> dict[str, list[Result]]:
    """The floors for mmproxy and its pinned variant, those of them that ran."""
    return {key: evaluate(summary, key, settings) for key in OURS_VARIANTS if key in summary}


def evaluate(summary: Summary, ours: str, settings: dict[str, Any]) -> list[Result]:
    """Every floor of issue 15 for `ours`: the figures, the ratio and PASS/MISS. Rows are
    the same for every variant of ours (the table puts them side by side)."""
    mine = summary.get(ours, {})
    variants = list(settings.get("rate_variants") or ["v1-ipv4"])
    framings = list(settings.get("udp_framings") or ["v2"])
    sizes = list(settings.get("udp_sizes") or [])
    rows = [_ratio_row(summary, ours, f) for f in rate_floors(variants) + bulk_floors()]
    for size in sizes:
        for framing in framings:
            rows += [_ratio_row(summary, ours, f) for f in udp_floors([framing], [size])]
            rows.append(_loss_row(mine, framing, size))
    rows += _hold_rows(mine, settings.get("hold_count", 9000))
    rows += _hold_max_rows(mine)
    rows.append(_cold_start_row(mine))
    return rows


def _ratio_row(summary: Summary, ours: str, floor: Floor) -> Result:
    row: Result = {"floor": floor.label, "metric": floor.metric, "ours": None, "best_peer": None,
                   "peer_value": None, "ratio": None, "verdict": "n/a"}  # fmt: skip
    value = summary.get(ours, {}).get(floor.metric)
    best = best_peer(summary, floor)
    if not _number(value) or best is None or best[1] == 0:
        return row
    ratio = value / best[1]
    ok = ratio >= floor.factor if floor.higher_is_better else ratio <= floor.factor
    row.update(ours=value, best_peer=TARGETS[best[0]].name, peer_value=best[1],
               ratio=round(ratio, 2), verdict="PASS" if ok else "MISS")  # fmt: skip
    return row


def _absolute(label: str, shown: object, ok: bool | None) -> Result:
    """A floor with no peer: the figure and PASS/MISS (n/a when it was not measured)."""
    verdict = "n/a" if ok is None else _verdict(ok)
    return {"floor": label, "ours": shown, "verdict": verdict}


def _loss_row(mine: dict[str, Any], framing: str, size: int) -> Result:
    loss = mine.get(udp_metric("udp_loss_pct", framing, size))
    label = f"UDP {framing}, {size} B: no loss"
    return _absolute(label, None if loss is None else f"{loss:g} %",
                     None if not _number(loss) else loss == 0)  # fmt: skip


def _hold_rows(ours: dict[str, Any], hold_count: int) -> list[Result]:
    held, alive = ours.get("held"), ours.get("alive")
    rss, fds = ours.get("rss_kib_per_conn"), ours.get("fds_per_conn")
    measured = held is not None
    return [
        _absolute(f"idle: {hold_count:,} connections held, none lost",
                  f"{_fmt(held, 0)} held, {_fmt(alive, 0)} alive" if measured else None,
                  held == hold_count and alive == held if measured else None),
        _absolute(f"idle at {hold_count:,}: two fds per connection", fds,
                  (_number(fds) and fds <= FDS_PER_CONN_MAX) if measured else None),
        _absolute(f"idle at {hold_count:,}: RSS per connection ≤ {RSS_PER_CONN_MAX_KIB:g} KiB",
                  rss, (_number(rss) and rss <= RSS_PER_CONN_MAX_KIB) if measured else None),
    ]  # fmt: skip


def _hold_max_rows(ours: dict[str, Any]) -> list[Result]:
    count, held, alive = ours.get("max_count"), ours.get("max_held"), ours.get("max_alive")
    rss, fds = ours.get("max_rss_kib_per_conn"), ours.get("max_fds_per_conn")
    measured = count is not None and held is not None
    return [
        _absolute("idle at the fd limit: all held and alive",
                  f"{_fmt(held, 0)} of {_fmt(count, 0)} held, {_fmt(alive, 0)} alive"
                  if measured else None,
                  held == count and alive == held if measured else None),
        _absolute("idle at the fd limit: two fds per connection", fds,
                  (_number(fds) and fds <= FDS_PER_CONN_MAX) if measured else None),
        _absolute(f"idle at the fd limit: RSS per connection ≤ {RSS_PER_CONN_MAX_KIB:g} KiB",
                  rss, (_number(rss) and rss <= RSS_PER_CONN_MAX_KIB) if measured else None),
    ]  # fmt: skip


def _cold_start_row(ours: dict[str, Any]) -> Result:
    """Filled in when bench/coldstart.py's figure is in the summary."""
    cold = ours.get(COLD_START_METRIC)
    return _absolute(f"cold start ≤ {COLD_START_MAX_MS:g} ms", cold,
                     (cold <= COLD_START_MAX_MS) if _number(cold) else None)  # fmt: skip


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# --- markdown ------------------------------------------------------------------------


def _fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int | float):
        if not math.isfinite(value):
            return "-"
        return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _rate_rows(summary: Summary, present: list[str], variants: list[str]) -> list[list[str]]:
    """One row per variant and target; direct (no header) once per family, first."""
    rows, families_done = [], set()
    for variant in variants:
        proxy, _, family = variant.partition("-")
        for key in present:
            if key == "direct":
                if family in families_done:
                    continue
                families_done.add(family)
            got = summary[key]
            header = "none" if key == "direct" else RATE_NAMES.get(proxy, proxy)
            rows.append([TARGETS[key].name, header, FAMILY_NAMES.get(family, family), *(
                _fmt(got.get(rate_metric(m, proxy, family)), d) for m, d in (
                    ("conn_per_s", 0), ("p50_ms", 2), ("p99_ms", 2), ("cpu_s_per_1k_conn", 3),
                    ("loadgen_cpus", 2), ("rate_errors", 0), ("rate_verified", 0)))])  # fmt: skip
    rows.sort(key=lambda row: row[2])  # IPv4's rows, then IPv6's (stable: the order above)
    return rows


def _max_table_rows(summary: Summary, present: list[str]) -> list[list[str]]:
    rows = []
    for key in present:
        got = summary[key]
        if got.get("max_count") is None:
            rows.append([TARGETS[key].name, "n/a (one process: its fd limit allows fewer)",
                         *["-"] * 7])  # fmt: skip
            continue
        rows.append([TARGETS[key].name, *(_fmt(got.get(m), d) for m, d in (
            ("max_count", 0), ("max_held", 0), ("max_alive", 0), ("max_rss_mib", 1),
            ("max_rss_kib_per_conn", 2), ("max_fds", 0), ("max_fds_per_conn", 2),
            ("max_threads", 0)))])  # fmt: skip
    return rows


def tables(summary: Summary, order: list[str], settings: dict[str, Any]) -> str:
    """The TCP result tables (medians over the rounds)."""
    names = {key: TARGETS[key].name for key in order}
    present = [key for key in order if key in summary]
    bulk_rows = [[names[k], *(_fmt(summary[k].get(m), d) for m, d in (
        ("upload_gbit_s", 2), ("download_gbit_s", 2), ("cpu_s_per_gib_up", 2),
        ("cpu_s_per_gib_down", 2), ("cpu_s_per_gib", 2), ("bulk_verified", 0)))]
        for k in present]  # fmt: skip
    variants = list(settings.get("rate_variants") or ["v1-ipv4"])
    rate_rows = _rate_rows(summary, present, variants)
    hold_rows = [[names[k], *(_fmt(summary[k].get(m), d) for m, d in (
        ("held", 0), ("alive", 0), ("rss_mib", 1), ("rss_kib_per_conn", 1), ("fds", 0),
        ("fds_per_conn", 2), ("threads", 0), ("cpus_allowed", 0), ("gateway_exit", 0)))]
        for k in present]  # fmt: skip
    max_rows = _max_table_rows(summary, present)
    gib = settings["bulk_bytes"] / (1 << 30)
    parts = [
        f"**1. Bulk throughput** — one connection, {gib:g} GiB each way "
        "(Gbit/s; gateway CPU-s per GiB moved)",
        _table(["target", "upload Gbit/s", "download Gbit/s", "CPU-s/GiB up",
                "CPU-s/GiB down", "CPU-s/GiB", "verified"], bulk_rows),
        f"**2. Connection rate** — {settings['rate_conc']} concurrent clients "
        f"({settings['rate_procs']} load-generator processes) for {settings['rate_seconds']:g} s "
        "per variant (PROXY v1 and v2, over IPv4 and over IPv6; a fresh gateway for each), "
        "each: connect, PROXY header + 64-byte request, 64-byte reply, close",
        _table(["target", "header", "family", "conn/s", "p50 ms", "p99 ms",
                "gateway CPU-s per 1,000 conns", "load generator CPUs busy", "errors",
                "verified"], rate_rows),
        f"**3. Concurrency** — {settings['hold_count']:,} idle connections held, then each "
        "pinged (gateway measured while all are held)",
        _table(["target", "held", "alive after", "RSS MiB", "RSS KiB/conn", "fds",
                "fds/conn", "threads", "CPU affinity", "exited by itself"], hold_rows),
        "A gateway that exited under load is measured by its fullest sample (they are taken "
        "every 0.05 s) over the most connections it held at once: approximate.",
    ]  # fmt: skip
    if any(row[2] != "-" for row in max_rows):
        parts += [
            "**3b. Idle connections at the fd limit** — as many as the open-file limit of "
            "each process allows (see *How it is measured*), held, measured, then each pinged",
            _table(["target", "connections", "held", "alive after", "RSS MiB",
                    "RSS KiB/conn", "fds", "fds/conn", "threads"], max_rows),
        ]  # fmt: skip
    return "\n\n".join(parts)


def floors_table(by_variant: dict[str, list[Result]]) -> str:
    """One row per floor: the best peer's figure, then each variant's figure, ratio, verdict."""
    variants = list(by_variant)
    if not variants:
        return "(mmproxy did not run: no floors)"
    header = ["floor", "peer"]
    for key in variants:
        header += [TARGETS[key].name, "ratio", "verdict"]
    body = []
    for i, first in enumerate(by_variant[variants[0]]):
        peer = first.get("best_peer")
        digits = DIGITS.get(_base_metric(first.get("metric", "")), 2)
        peer_value = _fmt(first.get("peer_value"), digits)
        row = [first["floor"], f"{peer}: {peer_value}" if peer else "-"]
        for key in variants:
            r = by_variant[key][i]
            row += [_fmt(r.get("ours"), digits), _fmt(r.get("ratio")), f"**{r['verdict']}**"]
        body.append(row)
    return _table(header, body)


def _base_metric(metric: str) -> str:
    """conn_per_s for conn_per_s_v2_ipv6, udp_pps for udp_pps_spp_64: the digits' key."""
    for base in DIGITS:
        if metric.startswith(base):
            return base
    return metric
