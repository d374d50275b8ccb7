"""Measure the fan-out: how many clients one server process feeds, how fast, and at what cost.

    python -m bench --mode threading,gevent --clients 1000,4000 --seconds 10 --repeat 3

For each client count, each round, and each server (this app in each mode,
every --server, and the Node reference): start it on one CPU, connect the
clients from this process on another, wait for a warm-up, then measure over a
steady window. Prints a row per run, then the medians with their ratios to the
reference; writes results.csv, summary.csv and results.png.
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
from bench.server import DEFAULT_REFERENCE_DIR, REFERENCE_NAME, Server, app_command, parse_server, reference_server

HONEST_LOAD = 1.5  # a load average above this means other programs share the CPUs
EPILOG = """\
A server command may start with NAME=value environment variables; {port} stands
for its port, and python for this interpreter. Every server gets PORT and
INTERVAL in its environment, and runs in the project's folder.
"""


def measure(server_spec, count, args, cpus):
    """Run one server with ``count`` clients; return the row of measurements."""
    name, command = server_spec
    server_cpu, _ = cpus
    server = Server(name, command, args.interval, server_cpu)
    try:
        server.start()
        time.sleep(0.5)  # let the server settle before taking its idle memory
        idle_memory = server.memory_bytes()
        return asyncio.run(load(server, count, idle_memory, args))
    finally:
        server.stop()


async def load(server, count, idle_memory, args):
    """Connect the clients, wait out the warm-up, and measure the steady window."""
    url = f"ws://127.0.0.1:{server.port}/socket.io/?EIO=4&transport=websocket"
    sent = {}  # broadcast id -> its payload's time, as the clients received them
    connected = await clients.connect_all(url, count, args.deflate, sent)
    try:
        await asyncio.sleep(args.warmup)
        start = window_edge(server)
        await asyncio.sleep(args.seconds)
        end = window_edge(server)
        memory = server.memory_bytes()
        patience = max(5.0, 5 * args.interval)
        window_ids = await window_broadcasts(sent, start["wall"], end["wall"], patience)
        await drain(connected, window_ids, timeout=patience)
        # Stop the server first: the clients' connections then close at once, with no handshake to wait for.
        await asyncio.to_thread(server.stop)
    finally:
        await clients.close_all(connected)
    return summarize(server.name, connected, window_ids, start, end, idle_memory, memory)


def window_edge(server):
    """Return the time, the server's CPU time and this process's CPU time, now."""
    return {
        "wall": time.time(),
        "time": time.monotonic(),
        "server_cpu": server.cpu_seconds(),
        "load_cpu": time.process_time(),
        "load_average": os.getloadavg()[0],
    }


async def window_broadcasts(sent, start, end, timeout):
    """Return the ids of the broadcasts made between wall-clock times ``start`` and ``end``.

    A broadcast is known once some client has it. Ids are consecutive, and each
    client gets them in order, so once any client has one made after ``end``,
    every id from the window's first to its last is known to exist, whoever got it.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(made >= end for made in list(sent.values())):
        await asyncio.sleep(0.05)
    inside = [broadcast_id for broadcast_id, made in list(sent.items()) if start <= made < end]
    if not inside:
        return range(0)
    return range(min(inside), max(inside) + 1)


async def drain(connected, window_ids, timeout):
    """Wait until every client has the window's last broadcast, or until ``timeout``."""
    deadline = time.monotonic() + timeout
    last_id = window_ids[-1] if window_ids else None
    while time.monotonic() < deadline:
        if all(last_id in client.latencies for client in connected):
            return
        await asyncio.sleep(0.05)


def summarize(name, connected, window_ids, start, end, idle_memory, memory):
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
        "server": name,
        "clients": len(connected),
        "broadcasts_per_s": len(window_ids) / seconds,
        "deliveries_per_s": delivered / seconds,
        "delivered_pct": 100 * delivered / expected if expected else 0.0,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "cpu_us_per_delivery": 1e6 * (end["server_cpu"] - start["server_cpu"]) / delivered if delivered else 0.0,
        "kb_per_connection": (memory - idle_memory) / len(connected) / 1024,
        "load_cpu_pct": 100 * (end["load_cpu"] - start["load_cpu"]) / seconds,
        "load_average": start["load_average"],
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


def choose_servers(args):
    """Return the (name, command) pairs to measure, and why the reference is left out (or None)."""
    servers = [(mode, app_command(mode)) for mode in args.mode]
    servers += args.server
    missing = None
    if args.reference is not None:
        name, command = reference_server(args.reference)
        if name is None:
            missing = command
        else:
            servers.append((name, command))
    names = [name for name, _ in servers]
    if len(set(names)) != len(names):
        sys.exit(f"two servers have the same name: {', '.join(names)}")
    if not servers:
        sys.exit("nothing to measure: give --mode, --server or --reference")
    return servers, missing


def main():
    """Run the benchmark from the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG
    )
    parser.add_argument(
        "--mode", type=comma_list(str), default=["threading"],
        help="this app in these async modes (threading,gevent); '' for none",
    )
    parser.add_argument(
        "--server", action="append", type=parse_server, default=[], metavar="NAME=COMMAND",
        help="another server to measure, e.g. 'gevent-ordinary=ASYNC_MODE=gevent FAST_FANOUT=0 "
             "python application.py --port {port}' (repeatable)",
    )
    parser.add_argument(
        "--reference", type=Path, default=Path(os.environ.get("NODE_REFERENCE", DEFAULT_REFERENCE_DIR)),
        metavar="DIR", help="the Node reference's folder (default: $NODE_REFERENCE, else %(default)s)",
    )
    parser.add_argument(
        "--no-reference", dest="reference", action="store_const", const=None, help="do not measure the reference"
    )
    parser.add_argument("--clients", type=comma_list(int), default=[100], help="client counts, e.g. 100,1000")
    parser.add_argument("--repeat", type=int, default=1, help="rounds: each server this many times per count")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the measured window")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds after connecting, before measuring")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between broadcasts")
    parser.add_argument(
        "--no-deflate", dest="deflate", action="store_false",
        help="do not offer WebSocket compression (browsers do, and the server accepts it)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="directory for CSV and plot")
    args = parser.parse_args()
    args.mode = [mode for mode in args.mode if mode]
    servers, missing_reference = choose_servers(args)
    if missing_reference:
        print(missing_reference, file=sys.stderr, flush=True)

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
    for count in args.clients:
        for round_number in range(args.repeat):
            # Interleaved, and each round in another order, so that a change in the
            # machine's load over time falls on every server alike.
            shift = round_number % len(servers)
            for server in servers[shift:] + servers[:shift]:
                try:
                    rows.append(measure(server, count, args, cpus))
                except (OSError, RuntimeError, websockets.WebSocketException) as error:
                    # A server that cannot take this many clients is a result too: say so, and go on.
                    failed += 1
                    print(f"{server[0]} with {count} clients failed: {error!r}", file=sys.stderr, flush=True)
                    continue
                print(report.format_row(rows[-1], first=len(rows) == 1), flush=True)
    if not rows:
        sys.exit("no measurement succeeded")
    summary = report.summarize(rows, reference=REFERENCE_NAME)
    print()
    print(report.format_summary(summary, reference=REFERENCE_NAME), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_csv(rows, args.out / "results.csv", report.COLUMNS)
    report.write_csv(summary, args.out / "summary.csv", report.SUMMARY_COLUMNS)
    report.plot(summary, machine, args.out / "results.png")
    if failed:
        sys.exit(f"{failed} of the measurements failed")


if __name__ == "__main__":
    main()
