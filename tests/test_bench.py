"""The benchmark still runs: a few clients for a few seconds, in both async modes and beside the Node reference."""
import csv
import os
import shutil
import subprocess
import sys

import pytest

from bench.report import COLUMNS, SUMMARY_COLUMNS
from bench.server import DEFAULT_REFERENCE_DIR
from live import PROJECT, skip_unless_ci

MODES = ["threading", "gevent"]
SHORT_RUN = ["--clients", "5", "--seconds", "2", "--warmup", "0.5", "--interval", "0.2"]


def run_benchmark(*options, out):
    command = [sys.executable, "-m", "bench", *options, *SHORT_RUN, "--out", str(out)]
    return subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=90)


def read_csv(path):
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        return reader.fieldnames, list(reader)


def assert_every_client_got_every_broadcast(rows):
    for row in rows:
        assert row["clients"] == "5"
        assert float(row["broadcasts_per_s"]) > 2  # about 5 a second: the window saw broadcasts
        assert float(row["delivered_pct"]) == 100.0, row
        assert 0 < float(row["p50_ms"]) <= float(row["p99_ms"])


def test_benchmark_runs_and_every_client_gets_every_broadcast(tmp_path):
    # A reference folder that was never installed: the benchmark says how to, and measures the rest.
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "server.js").write_text("")
    result = run_benchmark("--mode", ",".join(MODES), "--reference", str(reference), out=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "npm install --no-audit --no-fund" in result.stderr
    assert "measuring the rest" in result.stderr

    headings = [heading for _, heading, _ in COLUMNS]
    table = result.stdout.splitlines()
    assert [line.split()[0] for line in table[2:4]] == MODES, result.stdout
    assert all(heading in table[1] for heading in headings), result.stdout

    fieldnames, rows = read_csv(tmp_path / "results.csv")
    assert fieldnames == [key for key, _, _ in COLUMNS]
    assert [row["server"] for row in rows] == MODES
    assert_every_client_got_every_broadcast(rows)

    fieldnames, summary = read_csv(tmp_path / "summary.csv")
    assert fieldnames == [key for key, _, _ in SUMMARY_COLUMNS]
    assert [row["server"] for row in summary] == MODES
    assert all(row["p99_ratio"] == "" for row in summary)  # no reference, no ratio

    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")


def installed_reference():
    """Return the Node reference's folder; skip if it is not installed (.ci/run installs it; fail under CI=true)."""
    reference = os.environ.get("NODE_REFERENCE", str(DEFAULT_REFERENCE_DIR))
    if shutil.which("node") is None:
        skip_unless_ci("node is missing: apt-get install nodejs npm")
    if not os.path.isdir(os.path.join(reference, "node_modules", "socket.io")):
        skip_unless_ci(f"the Node reference is not installed in {reference}: npm install --no-audit --no-fund "
                       f"there, or in a copy named by NODE_REFERENCE (as .ci/run does)")
    return reference


def test_benchmark_measures_the_node_reference_in_the_same_run(tmp_path):
    reference = installed_reference()
    server = "gevent-again=ASYNC_MODE=gevent python application.py --port {port}"
    result = run_benchmark("--mode", "gevent", "--server", server, "--reference", reference,
                           "--repeat", "2", out=tmp_path)
    assert result.returncode == 0, result.stderr

    _, rows = read_csv(tmp_path / "results.csv")
    # Interleaved: each round runs every server, each in another order.
    assert [row["server"] for row in rows] == ["gevent", "gevent-again", "node", "gevent-again", "node", "gevent"]
    assert_every_client_got_every_broadcast(rows)

    _, summary = read_csv(tmp_path / "summary.csv")
    assert [row["server"] for row in summary] == ["node", "gevent", "gevent-again"]
    node, *apps = summary
    assert node["runs"] == "2"
    assert float(node["p99_ratio"]) == float(node["kb_ratio"]) == 1.0
    for row in apps:
        median_p99, node_p99 = float(row["p99_ms"]), float(node["p99_ms"])
        assert float(row["p99_ratio"]) == pytest.approx(median_p99 / node_p99, rel=0.01)
    assert "ratios to node" in result.stdout
