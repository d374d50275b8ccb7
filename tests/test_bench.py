"""The benchmark still runs: a few clients for a few seconds, in both async modes."""
import csv
import subprocess
import sys

from bench.report import COLUMNS
from live import PROJECT

MODES = ["threading", "gevent"]


def test_benchmark_runs_and_every_client_gets_every_broadcast(tmp_path):
    command = [sys.executable, "-m", "bench", "--mode", ",".join(MODES), "--clients", "5",
               "--seconds", "2", "--warmup", "0.5", "--interval", "0.2", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr

    headings = [heading for _, heading, _ in COLUMNS]
    table = result.stdout.splitlines()
    assert [line.split()[0] for line in table[2:]] == MODES, result.stdout
    assert all(heading in table[1] for heading in headings), result.stdout

    with open(tmp_path / "results.csv", newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
    assert reader.fieldnames == [key for key, _, _ in COLUMNS]
    assert [row["mode"] for row in rows] == MODES
    for row in rows:
        assert row["clients"] == "5"
        assert float(row["broadcasts_per_s"]) > 2  # about 5 a second: the window saw broadcasts
        assert float(row["delivered_pct"]) == 100.0, row
        assert 0 < float(row["p50_ms"]) <= float(row["p99_ms"])

    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")
