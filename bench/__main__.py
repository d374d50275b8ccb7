"""Measure the fan-out: how many clients one server process feeds, how fast, and at what cost.

    python -m bench --mode threading,gevent --clients 100,500,1000 --seconds 20 --out bench/results

For each mode and client count: start ``python application.py`` on one CPU,
connect the clients from this process on another, wait for a warm-up, then
measure over a steady window. Prints a table; writes results.csv and results.png.
"""
import argparse
import asyncio
import os
import resource
import sys
import time
from pathlib import Path

import websockets

from bench import clients, report
from bench.server import Server

HONEST_LOAD = 1.5  # a load average above this means other programs share the CPUs


def measure(mode, count, args, cpus):
    """Run the server in ``mode`` with ``count`` clients; return the row of measurements."""
    server_cpu, load_cpu = cpus
    server = Server(mode, args.interval, server_cpu)
    server.start()
    try:
        time.sleep(0.5)  # let the server settle before taking its idle memory
        idle_memory = server.memory_bytes()
        return asyncio.run(load(server, count, idle_memory, args))
    finally:
        server.stop()


async def load(server, count, idle_memory, args):
    """Connect the clients, wait out the warm-up, and measure the steady window."""
    url = f"ws://127.0.0.1:{server.port}/socket.io/?EIO=4&transport=websocket"
    connected = await clients.connect_all(url, count, args.deflate)
    try:
        await asyncio.sleep(args.warmup)
        start = await window_edge(server)
        await asyncio.sleep(args.seconds)
        end = await window_edge(server)
        memory = server.memory_bytes()
        window_ids = range(start["last_id"] + 1, end["last_id"] + 1)
        await drain(connected, window_ids, timeout=max(5.0, 5 * args.interval))
        # Stop the server first: the clients' connections then close at once, with no handshake to wait for.
        await asyncio.to_thread(server.stop)
    finally:
        await clients.close_all(connected)
    return summarize(server.mode, connected, window_ids, start, end, idle_memory, memory)


async def window_edge(server):
    """Return the server's last broadcast id and CPU time, and this process's CPU time, now."""
    health = await asyncio.to_thread(server.health)
    return {
        "last_id": health["last_id"],
        "clients": health["clients"],
        "time": time.monotonic(),
        "server_cpu": server.cpu_seconds(),
        "load_cpu": time.process_time(),
    }


async def drain(connected, window_ids, timeout):
    """Wait until every client has the window's last broadcast, or until ``timeout``."""
    deadline = time.monotonic() + timeout
    last_id = window_ids[-1] if window_ids else None
    while time.monotonic() < deadline:
        if all(last_id in client.latencies for client in connected):
            return
        await asyncio.sleep(0.05)


def summarize(mode, connected, window_ids, start, end, idle_memory, memory):
    """Turn what the clients recorded and the server used into one row of the table."""
    latencies = sorted(
        client.latencies[broadcast_id]
        for client in connected
        for broadcast_id in window_ids
        if broadcast_id in client.latencies
    )
    seconds = end["time"] - start["time"]
    expected = len(connected) * len(window_ids)
    delivered = len(latencies)
    return {
        "mode": mode,
        "clients": len(connected),
        "broadcasts_per_s": len(window_ids) / seconds,
        "deliveries_per_s": delivered / seconds,
        "delivered_pct": 100 * delivered / expected if expected else 0.0,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "cpu_us_per_delivery": 1e6 * (end["server_cpu"] - start["server_cpu"]) / delivered if delivered else 0.0,
        "kb_per_connection": (memory - idle_memory) / len(connected) / 1024,
        "load_cpu_pct": 100 * (end["load_cpu"] - start["load_cpu"]) / seconds,
    }


def percentile(values, percent):
    """Return the nearest-rank percentile of sorted ``values`` (0.0 for none)."""
    if not values:
        return 0.0
    rank = max(1, round(percent / 100 * len(values)))
    return values[rank - 1]


def choose_cpus():
    """Return (server CPU, load generator CPU), or (None, None) on a machine with one CPU."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return available[0], available[1]


def raise_open_files_limit():
    """Allow as many open files as the system lets us: one per client here, and in the server (inherited)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def comma_list(kind):
    """Return an argparse type for a comma-separated list of ``kind``."""
    return lambda text: [kind(item) for item in text.split(",")]


def main():
    """Run the benchmark from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", type=comma_list(str), default=["threading"], help="threading,gevent")
    parser.add_argument("--clients", type=comma_list(int), default=[100], help="client counts, e.g. 100,1000")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the measured window")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds after connecting, before measuring")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between broadcasts")
    parser.add_argument(
        "--no-deflate", dest="deflate", action="store_false",
        help="do not offer WebSocket compression (browsers do, and the server accepts it)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="directory for CSV and plot")
    args = parser.parse_args()

    machine = report.describe_machine()
    print(machine)
    if os.getloadavg()[0] > HONEST_LOAD:
        print(f"warning: load average above {HONEST_LOAD}: other programs share the CPUs", file=sys.stderr)
    raise_open_files_limit()
    cpus = choose_cpus()
    if cpus[1] is not None:
        os.sched_setaffinity(0, {cpus[1]})
    rows = []
    failed = 0
    for mode in args.mode:
        for count in args.clients:
            try:
                rows.append(measure(mode, count, args, cpus))
            except (OSError, RuntimeError, websockets.WebSocketException) as error:
                # A server that cannot take this many clients is a result too: say so, and go on.
                failed += 1
                print(f"{mode} with {count} clients failed: {error!r}", file=sys.stderr, flush=True)
                continue
            print(report.format_row(rows[-1], first=len(rows) == 1), flush=True)
    if not rows:
        sys.exit("no measurement succeeded")
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_csv(rows, args.out / "results.csv")
    report.plot(rows, machine, args.out / "results.png")
    if failed:
        sys.exit(f"{failed} of the measurements failed")


if __name__ == "__main__":
    main()
