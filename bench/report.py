"""The results: a table on the terminal, a CSV file and a plot."""
import csv
import os
import platform
import statistics

import matplotlib

matplotlib.use("Agg")  # draw to a file; no display needed
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

# Each column: its key in a row, its heading in the table, and how to format it.
COLUMNS = [
    ("server", "server", "{:<16}"),
    ("clients", "clients", "{:>7}"),
    ("broadcasts_per_s", "bcast/s", "{:>7.2f}"),
    ("deliveries_per_s", "deliv/s", "{:>8.0f}"),
    ("delivered_pct", "delivered %", "{:>11.2f}"),
    ("p50_ms", "p50 ms", "{:>7.1f}"),
    ("p99_ms", "p99 ms", "{:>7.1f}"),
    ("cpu_us_per_delivery", "CPU us/deliv", "{:>12.1f}"),
    ("kb_per_connection", "KB/conn", "{:>7.1f}"),
    ("load_cpu_pct", "load CPU %", "{:>10.0f}"),
    ("load_average", "load avg", "{:>8.2f}"),
]

# The medians of each server's runs at one client count, and their ratios to the reference's.
RATIOS = [("p99_ms", "p99_ratio"), ("cpu_us_per_delivery", "cpu_ratio"), ("kb_per_connection", "kb_ratio")]
SUMMARY_COLUMNS = [
    ("server", "server", "{:<16}"),
    ("clients", "clients", "{:>7}"),
    ("runs", "runs", "{:>4}"),
    ("delivered_pct", "min delivered %", "{:>15.2f}"),
    ("p50_ms", "p50 ms", "{:>7.1f}"),
    ("p99_ms", "p99 ms", "{:>7.1f}"),
    ("cpu_us_per_delivery", "CPU us/deliv", "{:>12.1f}"),
    ("kb_per_connection", "KB/conn", "{:>7.1f}"),
    ("p99_ratio", "p99 / ref", "{:>9.2f}"),
    ("cpu_ratio", "CPU / ref", "{:>9.2f}"),
    ("kb_ratio", "KB / ref", "{:>8.2f}"),
]


def describe_machine():
    """Return one line about where the numbers come from: CPU, cores, Python, load average."""
    model = "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()[0]
    return (
        f"{model}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}, load average {load:.2f}"
    )


def format_cells(row, columns):
    """Return each cell of a row as text; a missing value (no reference to compare with) is a dash."""
    cells = []
    for key, _, fmt in columns:
        value = row.get(key)
        if value is None:
            width = int("".join(ch for ch in fmt.split(".")[0] if ch.isdigit()) or 1)
            cells.append("-".rjust(width))
        else:
            cells.append(fmt.format(value))
    return cells


def format_table_line(row, columns, first):
    """Return a row as text, after the headings if it is the first."""
    cells = format_cells(row, columns)
    line = "  ".join(cells)
    if not first:
        return line
    widths = [len(cell) for cell in cells]
    headings = "  ".join(
        heading.ljust(width) if fmt.startswith("{:<") else heading.rjust(width)
        for (_, heading, fmt), width in zip(columns, widths)
    )
    return headings + "\n" + line


def format_row(row, first=False):
    """Return a run's row of the table as text, after the headings if it is the first."""
    return format_table_line(row, COLUMNS, first)


def summarize(rows, reference):
    """Return, per client count and server, the medians of its runs and their ratios to ``reference``'s."""
    groups = {}
    for row in rows:
        groups.setdefault((row["clients"], row["server"]), []).append(row)
    summary = []
    for (clients, server), runs in sorted(groups.items(), key=lambda item: item[0][0]):
        median = {key: statistics.median(run[key] for run in runs)
                  for key in ("p50_ms", "p99_ms", "cpu_us_per_delivery", "kb_per_connection")}
        summary.append({
            "server": server,
            "clients": clients,
            "runs": len(runs),
            # The worst run: a server that lost messages once did lose them.
            "delivered_pct": min(run["delivered_pct"] for run in runs),
            **median,
        })
    summary.sort(key=lambda row: (row["clients"], row["server"] != reference))
    by_key = {(row["clients"], row["server"]): row for row in summary}
    for row in summary:
        reference_row = by_key.get((row["clients"], reference))
        for key, ratio in RATIOS:
            usable = reference_row is not None and reference_row[key] > 0
            row[ratio] = row[key] / reference_row[key] if usable else None
    return summary


def format_summary(summary, reference):
    """Return the medians and ratios as text (``summarize`` puts the reference first at each count)."""
    lines = [f"Medians of the runs; ratios to {reference} at the same client count (below 1: better)"]
    for index, row in enumerate(summary):
        lines.append(format_table_line(row, SUMMARY_COLUMNS, first=index == 0))
    return "\n".join(lines)


def write_csv(rows, path, columns):
    """Write the rows to a CSV file, one column per measurement."""
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[key for key, _, _ in columns])
        writer.writeheader()
        for row in rows:
            writer.writerow({key: round(value, 3) if isinstance(value, float) else value
                             for key, value in row.items()})


def plot(summary, machine, path):
    """Plot the median p99 latency and CPU per delivery against clients, one line per server."""
    figure, (latency, cpu) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for server in dict.fromkeys(row["server"] for row in summary):
        server_rows = sorted((row for row in summary if row["server"] == server), key=lambda row: row["clients"])
        clients = [row["clients"] for row in server_rows]
        latency.plot(clients, [row["p99_ms"] for row in server_rows], marker="o", label=server)
        cpu.plot(clients, [row["cpu_us_per_delivery"] for row in server_rows], marker="o", label=server)
    latency.set(xlabel="clients", ylabel="p99 latency (ms)", title="Emit to receipt, 99th percentile")
    cpu.set(xlabel="clients", ylabel="server CPU per delivery (µs)", title="Server CPU per delivered message")
    for axes in (latency, cpu):
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(machine, fontsize=8)
    figure.savefig(path, dpi=100)
    plt.close(figure)
