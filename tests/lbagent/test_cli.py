"""The `lbagent` command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

from lbagent import cli

REPO = Path(__file__).resolve().parents[2]


def test_table_balance_and_moved_share(capsys):
    assert cli.main(["table", "--backends", "a,b,c,d", "--to", "a,b,c,d,e", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(r["buckets"] for r in out["backends"]) == [16384, 16384, 16384, 16385]
    assert all(abs(r["deviation"]) < 0.001 for r in out["backends"])
    assert 0.2 <= out["moved_share"] < 0.21
    assert out["ideal_moved_share"] == 0.2


def test_table_human_output_weights(capsys):
    assert cli.main(["table", "--backends", "x,y", "--weights", "1,3", "--table-size", "1021"]) == 0
    text = capsys.readouterr().out
    assert "1021 buckets over 2 backends" in text
    assert " 255 " in text  # x: 1/4 of 1021
    assert " 766 " in text  # y: 3/4


def test_bad_input_is_a_clear_error(capsys):
    assert cli.main(["table", "--backends", "a,b", "--table-size", "1000"]) == 2
    assert "not prime" in capsys.readouterr().err
    assert cli.main(["simulate", "--scenario", "nope"]) == 2
    assert "unknown scenario" in capsys.readouterr().err


def test_simulate_small_run(capsys):
    args = ["simulate", "--scenario", "drain", "--flows", "2000", "--new-flows", "200", "--json"]
    assert cli.main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["scenario"], r["stateful"]) for r in rows] == [("drain", True), ("drain", False)]
    assert rows[0]["broken"] == 0
    assert rows[1]["broken"] > 0


def test_delegated_command_missing_module(monkeypatch, capsys):
    monkeypatch.setitem(cli.DELEGATED, "lab", "lbagent.no_such_module")
    assert cli.main(["lab", "up"]) == 2
    assert "lbagent.no_such_module is not available" in capsys.readouterr().err


def test_python_m_lbagent_entry_point():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "lbagent", "table", "--backends", "a,b", "--table-size", "101"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "101 buckets over 2 backends" in proc.stdout
