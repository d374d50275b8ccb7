"""The results: a table on the terminal, a CSV file and a plot."""
import csv
import os
import platform

import matplotlib

matplotlib.use("Agg")  # draw to a file; no display needed
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

# Each column: its key in a row, its heading in the table, and how to format it.
COLUMNS = [
    ("mode", "mode", "{:<9}"),
    ("clients", "clients", "{:>7}"),
    ("broadcasts_per_s", "bcast/s", "{:>7.2f}"),
    ("deliveries_per_s", "deliv/s", "{:>8.0f}"),
    ("delivered_pct", "delivered %", "{:>11.2f}"),
    ("p50_ms", "p50 ms", "{:>7.1f}"),
    ("p99_ms", "p99 ms", "{:>7.1f}"),
    ("cpu_us_per_delivery", "CPU us/deliv", "{:>12.1f}"),
    ("kb_per_connection", "KB/conn", "{:>7.1f}"),
    ("load_cpu_pct", "load CPU %", "{:>10.0f}"),
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


def format_row(row, first=False):
    """Return a row of the table as text, after the headings if it is the first."""
    cells = [fmt.format(row[key]) for key, _, fmt in COLUMNS]
    line = "  ".join(cells)
    if not first:
        return line
    widths = [len(cell) for cell in cells]
    headings = "  ".join(
        heading.ljust(width) if fmt.startswith("{:<") else heading.rjust(width)
        for (_, heading, fmt), width in zip(COLUMNS, widths)
    )
    return headings + "\n" + line


def write_csv(rows, path):
    """Write the rows to a CSV file, one column per measurement."""
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[key for key, _, _ in COLUMNS])
        writer.writeheader()
        for row in rows:
            writer.writerow({key: round(value, 3) if isinstance(value, float) else value
                             for key, value in row.items()})


def plot(rows, machine, path):
    """Plot p99 latency and CPU per delivery against clients, one line per mode."""
    figure, (latency, cpu) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for mode in dict.fromkeys(row["mode"] for row in rows):
        mode_rows = sorted((row for row in rows if row["mode"] == mode), key=lambda row: row["clients"])
        clients = [row["clients"] for row in mode_rows]
        latency.plot(clients, [row["p99_ms"] for row in mode_rows], marker="o", label=mode)
        cpu.plot(clients, [row["cpu_us_per_delivery"] for row in mode_rows], marker="o", label=mode)
    latency.set(xlabel="clients", ylabel="p99 latency (ms)", title="Emit to receipt, 99th percentile")
    cpu.set(xlabel="clients", ylabel="server CPU per delivery (µs)", title="Server CPU per delivered message")
    for axes in (latency, cpu):
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(machine, fontsize=8)
    figure.savefig(path, dpi=100)
    plt.close(figure)
