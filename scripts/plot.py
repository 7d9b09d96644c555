#!/usr/bin/env python3
"""Plots for docs/benchmarks/ from the CSVs scripts/bench wrote to target/bench/ (matplotlib)."""
import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BENCH = sys.argv[1] if len(sys.argv) > 1 else "target/bench"
OUT = sys.argv[2] if len(sys.argv) > 2 else "docs/benchmarks"


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def storm_sim(path, png):
    data = rows(path)
    # Older CSVs have neither column: a 30 s outage of 10,000 devices.
    outage = int(data[0].get("outage_s") or 30)
    n = int(data[0].get("devices") or 10000)
    title = f"{n:,} simulated engines after a {outage} s broker outage, then {data[0]['capacity']} CONNECTs/s"
    strategies = []
    for r in data:
        if r["strategy"] not in strategies:
            strategies.append(r["strategy"])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    cap = None
    top = 10
    t99 = []
    for s in strategies:
        rs = [r for r in data if r["strategy"] == s]
        t = [int(r["second"]) for r in rs]
        acc = [int(r["accepted"]) for r in rs]
        ref = [int(r["refused"]) for r in rs]
        cap = int(rs[0]["capacity"])
        top = max(top, max(a + b for a, b in zip(acc, ref)))
        back = [x for x, r in zip(t, rs) if x >= outage and float(r["online_fraction"]) >= 0.99]
        if back:
            t99.append(back[0])
        width = 2.2 if s == "imlinkd" else 1.2
        line = ax1.plot(t, [a + b for a, b in zip(acc, ref)], linewidth=width, label=f"{s}: attempts")[0]
        ax1.plot(t, acc, linestyle=":", color=line.get_color(), label=f"{s}: accepted")
        ax2.plot(t, [float(r["online_fraction"]) for r in rs], color=line.get_color(), linewidth=width, label=s)
    ax1.axhline(cap, color="black", linestyle="--", linewidth=1, label=f"capacity {cap}/s")
    ax1.axvspan(0, outage, color="grey", alpha=0.15, label="broker gone")
    ax1.set_yscale("symlog", linthresh=10)
    # Room above the highest line for the legend.
    ax1.set_ylim(0, top * 300)
    ax1.set_ylabel("CONNECTs per second (log)")
    ax1.set_title(title)
    ax1.legend(fontsize=7, ncol=3, loc="upper center")
    ax2.axvspan(0, outage, color="grey", alpha=0.15)
    target = outage + 2 * n / cap + 10
    ax2.axhline(0.99, color="black", linewidth=0.5)
    ax2.axvline(target, color="black", linestyle="--", linewidth=1,
                label=f"target: 99 % within 2 × N ÷ capacity + 10 s = {target - outage:.0f} s of the return")
    ax2.set_ylabel("fraction online")
    ax2.set_xlabel("seconds since the broker went away")
    ax2.set_ylim(0, 1.02)
    # Every strategy's 99 % in view.
    ax2.set_xlim(-5, max([outage + 210] + [x + 20 for x in t99]))
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def storm_real_vs_sim(real_path, sim_path, png):
    real = rows(real_path)
    sim = [r for r in rows(sim_path) if r["strategy"] == "imlinkd"]
    n_real = max(int(r["online"]) for r in real) or 1
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    t = [int(r["second"]) for r in real]
    ax1.plot(t, [int(r["accepted"]) + int(r["refused"]) for r in real], label="real fleet: CONNECTs reaching the broker")
    ts = [int(r["second"]) for r in sim]
    ax1.plot(ts, [int(r["accepted"]) + int(r["refused"]) for r in sim], linestyle="--", label="simulated engines: CONNECTs")
    cap = int(real[0]["capacity"])
    ax1.axhline(cap, color="black", linestyle=":", linewidth=1, label=f"capacity {cap}/s")
    ax1.axvspan(0, 30, color="grey", alpha=0.15, label="broker gone")
    ax1.set_ylabel("CONNECTs per second")
    ax1.set_title("Reconnect storm: real imlinkd processes vs the simulated engines (same fleet, same capacity)")
    ax1.legend(fontsize=8)
    ax2.plot(t, [int(r["online"]) / n_real for r in real], label="real")
    ax2.plot(ts, [float(r["online_fraction"]) for r in sim], linestyle="--", label="simulated")
    ax2.axvspan(0, 30, color="grey", alpha=0.15)
    ax2.set_ylabel("fraction online")
    ax2.set_xlabel("seconds since the broker went away")
    ax2.set_xlim(0, max(t[-1], 60))
    ax2.set_ylim(0, 1.02)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def storm_cluster(path, md_path, png):
    """The fleet after a node loss on the real cluster: CONNECTs per second beside the measured
    capacity, and the fleet as the operator sees it through the retained status topics."""
    data = rows(path)
    t = [int(r["second"]) for r in data]
    n = int(data[0]["devices"])
    cap = float(data[0]["capacity"])
    title = f"{n} imlinkd on a 3-node nats-server cluster with imlink-auth: the node they are on is killed at 0 s"
    if os.path.exists(md_path):
        for line in open(md_path):
            if line.startswith("| node killed"):
                title += "\n(" + line.split("|")[2].strip().replace("$", r"\$") + ")"
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    ax1.plot(t, [int(r["attempts"]) for r in data], label="connections accepted by the surviving nodes (CONNECTs)")
    ax1.axhline(cap, color="black", linestyle="--", linewidth=1, label=f"measured CONNECT capacity {cap:.0f}/s")
    ax1.set_ylabel("per second")
    ax1.set_title(title, fontsize=10)
    ax1.set_ylim(0, max(cap, max(int(r["attempts"]) for r in data)) * 1.25)
    ax1.legend(fontsize=8, loc="upper right")
    keys = [("back", "online, on another node"), ("subscribing", "logged in, inbox not yet granted"),
            ("offline", "offline (last will)"), ("stale", "still 'online' on the dead node (its wills died with it)"),
            ("other", "stopped, kicked, logged out")]
    colors = ["tab:green", "tab:olive", "tab:red", "tab:grey", "tab:purple"]
    ax2.stackplot(t, *[[int(r[k]) / n for r in data] for k, _ in keys], labels=[l for _, l in keys],
                  colors=colors, alpha=0.8)
    if "online_truth" in data[0]:
        ax2.plot(t, [int(r["online_truth"]) / n for r in data], color="black",
                 label="online again by the daemons' own logs (the truth)")
    ax2.plot(t, [min(int(r["open"]), n) / n for r in data], color="black", linestyle=":",
             label="TCP connections open on the surviving nodes ÷ N")
    ax2.axhline(0.99, color="black", linewidth=0.5)
    limit = n / cap
    ax2.axvline(2 * limit + 10, color="tab:blue", linestyle="--", linewidth=1,
                label=f"target: 99 % within 2 × N ÷ capacity + 10 s = {2 * limit + 10:.0f} s")
    ax2.set_ylabel("fraction of the fleet, as the operator sees it")
    ax2.set_xlabel("seconds since the node was killed")
    ax2.set_ylim(0, 1.02)
    back = [x for x, r in zip(t, data) if int(r["back"]) >= n]
    ax2.set_xlim(0, max(30, (back[0] + 15) if back else t[-1]))
    ax2.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def watchers(path, png):
    data = rows(path)
    n = [int(r["watchers"]) for r in data]
    rss = [int(r["rss_kib"]) for r in data]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(n, rss, marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("idle API watchers")
    ax.set_ylabel("imlinkd RSS (KiB)")
    for x, y, r in zip(n, rss, data):
        ax.annotate(f"{float(r['per_watcher_kib']):.1f} KiB each", (x, y), fontsize=7,
                    textcoords="offset points", xytext=(4, -10))
    ax.set_title("Memory per watcher")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


os.makedirs(OUT, exist_ok=True)
made = []
for run, png in [("sim10k", "storm-simulated.png"), ("sim10k-300s", "storm-simulated-300s.png")]:
    p = os.path.join(BENCH, run, "storm-sim.csv")
    if os.path.exists(p):
        storm_sim(p, os.path.join(OUT, png))
        made.append(png)
r, s = os.path.join(BENCH, "storm-real.csv"), os.path.join(BENCH, "simfleet", "storm-sim.csv")
if os.path.exists(r) and os.path.exists(s):
    storm_real_vs_sim(r, s, os.path.join(OUT, "storm-real-vs-simulated.png"))
    made.append("storm-real-vs-simulated.png")
p = os.path.join(BENCH, "storm-cluster.csv")
if os.path.exists(p):
    storm_cluster(p, os.path.join(BENCH, "storm-cluster.md"), os.path.join(OUT, "storm-cluster.png"))
    made.append("storm-cluster.png")
p = os.path.join(BENCH, "watchers.csv")
if os.path.exists(p):
    watchers(p, os.path.join(OUT, "watchers.png"))
    made.append("watchers.png")
print("plots:", ", ".join(made) or "none (no CSVs)")
