"""``diffloom batch`` on the shipped model at tiny settings: one process, two torch.distributed (gloo) processes and a
local two-CPU Ray cluster make byte-identical images and the same manifest; a killed run resumes and makes every
item exactly once; bad input is one line and exit code 2.

The reference job runs in this process; the scale-out engines run the `diffloom` command in subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from diffloom.cli import main

ITEMS = 24
SIZE, STEPS = "32", "2"  # command-line defaults of the job; some items override them


def write_job(path: Path, count: int = ITEMS) -> Path:
    shapes = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
    lines = []
    for i in range(count):
        item = {"prompt": f"{shapes[i % 4]} on a white background"}
        if i % 3 == 0:
            item["seed"] = 1000 + i
        if i % 5 == 1:
            item["negative_prompt"] = "blurry"
        if i % 7 == 2:
            item["size"] = "40x32"
        if i % 8 == 3:
            item["scheduler"] = "EulerDiscreteScheduler"
        if i % 6 == 4:
            item.update(steps=3, guidance=1.0)
        lines.append(json.dumps(item))
        if i == 10:
            lines.append("")  # blank lines are allowed and keep their number
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(*argv):
    """The `diffloom` command in a subprocess: (exit code, stderr)."""
    result = subprocess.run([sys.executable, "-m", "diffloom", *argv], capture_output=True, text=True, timeout=240)
    return result.returncode, result.stderr


def rows_of(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("timing")
    return rows


def images_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def png_chunk_types(data: bytes) -> list[str]:
    types, at = [], 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        types.append(kind.decode())
        at += 12 + length
    return types


@pytest.fixture(autouse=True)
def keep_torch_threads():
    # The batch command computes with one CPU thread; give the rest of the test session its setting back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return write_job(tmp_path_factory.mktemp("batch") / "prompts.jsonl")


@pytest.fixture(scope="module")
def reference(job, tmp_path_factory):
    """The job made by one process (the local engine), in this process."""
    out = tmp_path_factory.mktemp("reference") / "out"
    threads = torch.get_num_threads()
    try:
        assert main(["batch", str(job), "--out", str(out), "--size", SIZE, "--steps", STEPS]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_local_job_manifest_and_files(job, reference):
    rows = rows_of(reference)
    images = images_of(reference)
    assert [row["line"] for row in rows] == [n for n in range(1, ITEMS + 2) if n != 12]  # line 12 is blank
    assert sorted(images) == sorted(row["file"] for row in rows)
    first = rows[0]
    assert first["seed"] == 1000 and first["settings"] == {
        "steps": 2, "guidance": 2.0, "size": [32, 32], "scheduler": "DPMSolverMultistepScheduler"}
    by_line = {row["line"]: row for row in rows}
    assert by_line[3]["settings"]["size"] == [40, 32]
    assert by_line[4]["settings"]["scheduler"] == "EulerDiscreteScheduler"
    assert by_line[5]["settings"]["steps"] == 3 and by_line[5]["settings"]["guidance"] == 1.0
    assert by_line[2]["negative_prompt"] == "blurry"
    assert len({row["seed"] for row in rows}) == ITEMS  # derived seeds differ from item to item
    for data in images.values():
        assert png_chunk_types(data) == ["IHDR", "IDAT", "IEND"]  # no time, no text: same pixels, same bytes
    # The same items again give the same seeds, ids and files: nothing is made twice.
    before = (reference / "manifest.jsonl").read_bytes()
    code = main(["batch", str(job), "--out", str(reference), "--size", SIZE, "--steps", STEPS])
    assert code == 0 and (reference / "manifest.jsonl").read_bytes() == before
    assert images_of(reference) == images


def test_torchrun_two_gloo_workers_match_one_process(job, reference, tmp_path):
    out = tmp_path / "out"
    code, err = run_cli("batch", str(job), "--out", str(out), "--size", SIZE, "--steps", STEPS,
                        "--engine", "torchrun", "--workers", "2")
    assert code == 0, err
    assert "to make (torchrun, 2 workers)" in err
    assert re.search(rf"batch: {ITEMS}/{ITEMS} images, [\d.]+ images/s, ETA 0:00", err), err  # the whole job's
    assert images_of(out) == images_of(reference)
    assert rows_of(out) == rows_of(reference)
    assert not list(out.glob("manifest.rank-*")) and not list(out.glob(".*"))


def test_ray_two_actors_match_one_process(job, reference, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": "local"}
    result = subprocess.run([sys.executable, "-m", "diffloom", "batch", str(job), "--out", str(out), "--size", SIZE,
                             "--steps", STEPS, "--engine", "ray", "--workers", "2"],
                            capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr
    assert "to make (ray, 2 workers)" in result.stderr
    assert images_of(out) == images_of(reference)
    assert rows_of(out) == rows_of(reference)


def worker_processes(launcher_pid: int) -> list[psutil.Process]:
    """The batch workers below a launcher: processes torchrun started (they have RANK in their environment), or
    the processes torch's elastic launcher spawned."""
    workers = []
    for process in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if "RANK" in process.environ() or "spawn_main" in " ".join(process.cmdline()):
                workers.append(process)
        except psutil.NoSuchProcess:
            pass
    return workers


@pytest.mark.parametrize("launch", ["under-torchrun", "workers-option"])
def test_killed_worker_then_rerun_makes_every_item_exactly_once(tmp_path, launch):
    job = write_job(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    # Full-size images with a few steps, so that the worker is killed mid-run.
    batch = ["-m", "diffloom", "batch", str(job), "--out", str(out), "--steps", "4", "--engine", "torchrun"]
    if launch == "under-torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "--monitor-interval", "0.1", *batch]
    else:
        command = [sys.executable, *batch, "--workers", "2"]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size for p in out.glob("manifest.rank-*.jsonl")):
            assert launcher.poll() is None and time.monotonic() < deadline, "no image was made"
            time.sleep(0.02)
        workers = worker_processes(launcher.pid)
        assert len(workers) == 2
        os.kill(workers[-1].pid, signal.SIGKILL)
        _, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0, err
    if launch == "workers-option":
        assert launcher.returncode == 1 and "run the same command again to make the rest" in err, err
    made = [json.loads(line) for p in out.glob("manifest.rank-*.jsonl") for line in p.read_text().splitlines()
            if line.endswith("}")]
    assert 0 < len(made) < ITEMS  # the run stopped part way

    launcher = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert launcher.returncode == 0, launcher.stderr
    assert f"{len(made)} already done, {ITEMS - len(made)} to make" in launcher.stderr
    rows = rows_of(out)
    lines = [row["line"] for row in rows]
    assert len(lines) == len(set(lines)) == ITEMS
    assert sorted(p.name for p in out.glob("*.png")) == sorted(row["file"] for row in rows)
    assert not list(out.glob("manifest.rank-*")) and not list(out.glob(".*"))


def test_resume_repairs_missing_files_rows_and_leftovers(job, reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, data in images_of(reference).items():
        (out / name).write_bytes(data)
    manifest = (reference / "manifest.jsonl").read_text().splitlines(keepends=True)
    rows = [json.loads(line) for line in manifest]
    (out / rows[0]["file"]).unlink()                       # a row whose image is gone
    (out / "manifest.jsonl").write_text("".join(manifest[2:]))
    (out / "manifest.rank-3.jsonl").write_text(manifest[2] + manifest[2][:40])  # a duplicate, then a torn row
    (out / f".{rows[1]['file']}.999.tmp").write_bytes(b"half an image")    # rows[1]: image there, row lost
    code = main(["batch", str(job), "--out", str(out), "--size", SIZE, "--steps", STEPS])
    assert code == 0
    assert images_of(out) == images_of(reference)
    assert rows_of(out) == rows_of(reference)
    assert not list(out.glob("manifest.rank-*")) and not list(out.glob(".*"))


@pytest.mark.parametrize("content, expected", [
    ('{"prompt": "a red circle"}\n{"prompt": "a blue square",}\n', "line 2: not valid JSON"),
    ('{"prompt": "a red circle"}\n\n{"seed": 3}\n', "line 3: no \"prompt\""),
    ('{"prompt": "a red circle", "stpes": 4}\n', "line 1: unknown setting 'stpes'; did you mean steps?"),
    ('{"prompt": "a red circle", "size": "30x30"}\n', "line 1: size 30x30: width and height must be positive "
                                                      "multiples of 8"),
    ('{"prompt": "a red circle", "scheduler": "Eulr"}\n', "line 1: scheduler Eulr: no such scheduler"),
    ('{"prompt": "a red circle", "steps": "4"}\n', "line 1: steps must be an integer, not \"4\""),
    ('["a red circle"]\n', "line 1: expected a JSON object"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, content, expected):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    code = main(["batch", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"diffloom batch: error: {path}, ") and expected in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_bad_options_are_one_line_and_exit_2(capsys, tmp_path):
    path = write_job(tmp_path / "prompts.jsonl", count=2)
    for argv, expected in [(["--workers", "2"], "--workers: the local engine is this one process"),
                           (["--steps", "0"], "--steps 0: give at least 1 step"),
                           (["--engine", "torchrun", "--device", "cpu"], "--device: the torchrun engine")]:
        code = main(["batch", str(path), "--out", str(tmp_path / "out"), *argv])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and expected in lines[0], lines
    code = main(["batch", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out")])
    assert code == 2 and "missing.jsonl: no such file" in capsys.readouterr().err
