"""Safety properties: checkpoints load tensors only, are written atomically, nothing listens on
all interfaces by default, and sweep names cannot write outside the results folder."""
import ast
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vpns_core.checkpoint import CheckpointError, atomic_save, check_readable, safe_load

ROOT = Path(__file__).resolve().parents[1]
CODE = [p for folder in ("vpns_core", "sweeps", "analysis", "search_spaces", "scripts", "benchmarks")
        for p in sorted((ROOT / folder).rglob("*.py"))]


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (self.marker, "w"))


def test_every_torch_load_in_the_code_passes_weights_only_true():
    calls = []
    for path in CODE:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and getattr(node.func.value, "id", None) == "torch"):
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", ok))
    assert calls, "no torch.load found: the scan is broken"
    assert [c for c, ok in calls if not ok] == []
    assert not [p for p in CODE if re.search(r"\bpickle\.loads?\(|\bcloudpickle\.loads?\(", p.read_text())]


def test_pickled_objects_are_refused_not_executed(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _Evil(tmp_path / "pwned")}, evil)
    with pytest.raises(CheckpointError, match="cannot read"):
        safe_load(evil)
    with pytest.raises(CheckpointError, match="^mask_file: cannot read"):
        check_readable(evil, "mask_file")
    assert not (tmp_path / "pwned").exists()


def test_a_write_that_fails_midway_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    atomic_save({"version": 1}, target)

    def broken_save(obj, handle):
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"version": 2}, target)
    assert safe_load(target) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left


def test_exports_are_written_atomically(tmp_path, monkeypatch):
    """Parquet, table CSV, figures and report go through one atomic writer: a failure midway
    leaves the previous file whole (here the table CSV)."""
    import analysis
    from vpns_core import checkpoint
    path = analysis._write_table([{"pad": 8, "acc": 0.5}], tmp_path / "table.csv")
    original = checkpoint.atomic_write

    def failing(target, write):
        def half(handle):
            write(handle)
            raise OSError("killed")
        return original(target, half)
    monkeypatch.setattr(analysis, "atomic_write", failing)
    with pytest.raises(OSError, match="killed"):
        analysis._write_table([{"pad": 16, "acc": 0.9}], path)
    assert path.read_text().splitlines() == ["pad,acc", "8,0.5"]
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


_WRITER = """
import sys, torch
from vpns_core.checkpoint import atomic_save
big = torch.randn(4_000_000)  # 16 MB: kills land inside torch.save
for version in range(10**6):
    data = big + version
    atomic_save({"version": version, "data": data, "sum": data.sum()}, sys.argv[1])
    print(version, flush=True)
"""


def test_kill_9_during_writes_never_leaves_a_half_written_checkpoint(tmp_path):
    target = tmp_path / "checkpoint.pt"
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE,
                                text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        written = int(proc.stdout.readline())  # one complete write, then kill at some point after
        time.sleep(0.05 + 0.1 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = safe_load(target)  # the last complete version, never a torn one
        assert state["version"] >= written
        assert torch.allclose(state["data"].sum(), state["sum"], rtol=1e-5)  # data and checksum: one write
    atomic_save({"version": -1}, target)  # the next write sweeps away a killed writer's temp file
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


_EXPORTER = """
import sys
import pyarrow as pa, pyarrow.parquet as pq
from vpns_core.checkpoint import atomic_write
n = 200_000
base = pa.table({"trial": pa.array(range(n)), "note": pa.array(["x" * 200] * n)})  # ~40 MB a write
for version in range(10**6):
    table = base.append_column("version", pa.array([version] * n))
    atomic_write(sys.argv[1], lambda handle: pq.write_table(table, handle))
    print(version, flush=True)
"""


def test_kill_9_during_a_parquet_export_leaves_the_last_whole_file(tmp_path):
    """The sweep's exports (trials.parquet, epochs.parquet) go through the same atomic writer:
    a real kill -9 while Parquet is being written leaves the previous export readable."""
    import pyarrow.parquet as pq
    target = tmp_path / "trials.parquet"
    for attempt in range(2):
        proc = subprocess.Popen([sys.executable, "-c", _EXPORTER, str(target)], stdout=subprocess.PIPE,
                                text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        written = int(proc.stdout.readline())
        time.sleep(0.2 + 0.3 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        table = pq.read_table(target)
        assert table.num_rows == 200_000 and table["version"][0].as_py() >= written
        assert len(set(table["version"].to_pylist())) == 1  # one write, never two halves


def test_local_ray_starts_without_dashboard(tmp_path, monkeypatch):
    import ray

    from sweeps.sweep import run_sweep
    seen = {}

    class Started(Exception):
        pass

    def fake_init(*args, **kwargs):
        seen.update(kwargs, args=args)
        raise Started
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    with pytest.raises(Started):
        run_sweep("test_security", lambda sweep: None,
                         ["--preset", "tiny", "--storage-path", str(tmp_path)])
    assert seen["include_dashboard"] is False and "dashboard_host" not in seen
    assert not seen["args"] and "address" not in seen  # a local instance, not a remote one


def test_documented_commands_bind_loopback_only():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "cluster").glob("*")), *sorted((ROOT / "scripts").glob("*.sh"))]
    text = "\n".join(p.read_text() for p in docs if p.is_file())
    assert "0.0.0.0" not in text
    for line in text.splitlines():
        if re.search(r"mlflow (ui|server)\b", line):
            assert "--host 127.0.0.1" in line, line
        if "ray start --head" in line:
            assert "--dashboard-host=127.0.0.1" in line, line


@pytest.mark.parametrize("name,ok", [("ablation_pad-default-20260101-000000", True), ("killed", True),
                                     ("a.b=c+d", True), ("..", False), ("../x", False), ("x/..", False),
                                     ("a/b", False), ("/tmp/x", False), ("", False), (".hidden", False),
                                     ("a\\b", False), ("~user", False)])
def test_sweep_names_stay_inside_the_storage_folder(name, ok, tmp_path):
    from sweeps.sweep import sweep_folder
    from sweeps.preflight import UsageError
    if ok:
        assert sweep_folder(tmp_path, name).parent == tmp_path.resolve()
    else:
        with pytest.raises(UsageError, match="--name"):
            sweep_folder(tmp_path, name)
