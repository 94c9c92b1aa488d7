"""Robust runs: durable atomic writes with one file mode, a safe folder swap, strict JSON metrics, and a
run whose every step was skipped failing loudly."""

from __future__ import annotations

import json
import os
import stat

import pytest

from raymeta.cli import main
from raymeta.infra import io
from tests.conftest import tiny_run_folder, tiny_train_overrides


def test_atomic_writes_fsync_and_give_every_file_one_mode(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:  # the real fsync, recording what it was called on
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    io.atomic_write_text(tmp_path / "a" / "x.txt", "hello")
    io.atomic_write_bytes(tmp_path / "a" / "y.bin", b"\x00\x01")
    io.atomic_write_json(tmp_path / "a" / "z.json", {"k": 1})
    assert (tmp_path / "a" / "x.txt").read_text() == "hello"
    assert str(tmp_path / "a") in synced  # the folder, after the rename
    assert any(p.endswith(".tmp") for p in synced)  # the file, before it
    for name in ("x.txt", "y.bin", "z.json"):
        assert stat.S_IMODE((tmp_path / "a" / name).stat().st_mode) == io.FILE_MODE
    assert io.FILE_MODE == 0o666 & ~io._UMASK and io.FILE_MODE & 0o040  # group-readable under the usual umasks
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp files left


def test_atomic_dir_swaps_whole_folders_and_keeps_the_old_one_on_failure(tmp_path):
    final = tmp_path / "ckpt"
    with io.atomic_dir(final) as tmp:
        (tmp / "w").write_text("one")
    with pytest.raises(RuntimeError), io.atomic_dir(final) as tmp:
        (tmp / "w").write_text("half")
        raise RuntimeError("killed mid-way")
    assert (final / "w").read_text() == "one"
    with io.atomic_dir(final) as tmp:
        (tmp / "w").write_text("two")
    assert (final / "w").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or old folder left


def test_a_run_whose_every_step_is_skipped_exits_non_zero_and_metrics_stay_strict_json(tmp_path, gpt2_tokenizer, capsys):
    root = tiny_run_folder(tmp_path / "t", gpt2_tokenizer)
    out = tmp_path / "run"
    # eps_root 0: Adam's sqrt at v = 0 (embedding rows no token of the batch touches) turns the second-order
    # meta-gradient into NaN (0 * inf), so every step is skipped
    args = tiny_train_overrides(root / "model", root / "data", out, "steps=2", "distributed=false", "eps_root=0")
    (tmp_path / "empty.yaml").write_text("{}\n")
    assert main(["train", "--quiet", str(tmp_path / "empty.yaml"), *args]) == 1
    err = capsys.readouterr().err
    assert "every meta-step was skipped" in err and "Traceback" not in err

    def no_constants(name: str) -> None:
        raise AssertionError(f"metrics.jsonl holds {name}, which is not JSON")

    records = [json.loads(line, parse_constant=no_constants) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [1, 2]
    assert any(v is None for r in records for v in r.values())  # the non-finite losses, as null


def _refused(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_resume_refuses_a_changed_config_and_keeps_the_original(tmp_path, gpt2_tokenizer, capsys):
    root = tiny_run_folder(tmp_path / "t", gpt2_tokenizer)
    out = tmp_path / "run"
    (tmp_path / "c.yaml").write_text("{}\n")
    base = ["train", "--quiet", str(tmp_path / "c.yaml"), *tiny_train_overrides(root / "model", root / "data", out)]
    assert main([*base, "steps=2", "distributed=false"]) == 0
    original = (out / "config.yaml").read_text()
    err = _refused(capsys, [*base, "steps=4", "distributed=false", "inner.lr=0.002", "seed=3", "--resume"])
    assert "inner.lr: 0.001 -> 0.002" in err and "seed: 0 -> 3" in err and "start a new run" in err
    err = _refused(capsys, [*base, "steps=4", "distributed=false", "device=cpu", "--resume"])
    assert "device: 'auto' -> 'cpu'" in err and "--allow-changes" in err
    err = _refused(capsys, [*base, "steps=4", "distributed=false", "method=fomaml", "--resume", "--allow-changes"])
    assert "method: 'maml_en_llm' -> 'fomaml'" in err
    assert (out / "config.yaml").read_text() == original and len((out / "metrics.jsonl").read_text().splitlines()) == 2
    # steps and checkpointing may change; placement with --allow-changes; config.yaml stays the original
    assert main([*base, "steps=3", "distributed=false", "checkpoint_every=1", "device=cpu", "--resume", "--allow-changes"]) == 0
    assert (out / "config.yaml").read_text() == original
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, gpt2_tokenizer):
    """A finished 3-step run with a checkpoint per step, to damage copies of."""
    base = tmp_path_factory.mktemp("trained")
    root = tiny_run_folder(base / "t", gpt2_tokenizer)
    (base / "c.yaml").write_text("{}\n")
    args = tiny_train_overrides(root / "model", root / "data", base / "run", "distributed=false", "checkpoint_every=1")
    assert main(["train", "--quiet", str(base / "c.yaml"), *args, "steps=3"]) == 0
    return base, args


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same size, other content
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": lambda ck: _truncate(ck / "model" / "model.safetensors"),
    "flipped optimizer byte": lambda ck: _flip(ck / "optimizer.safetensors"),
    "missing optimizer": lambda ck: (ck / "optimizer.safetensors").unlink(),
    "garbage state.json": lambda ck: (ck / "state.json").write_bytes(b"\xff{garbage"),
    "no manifest (torn write)": lambda ck: (ck / "manifest.json").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_falls_back_past_a_corrupt_latest_checkpoint(trained, tmp_path, capsys, damage):
    import shutil

    base, args = trained
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    DAMAGE[damage](run / "checkpoints" / "step-000003")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "meta_lo')  # and a torn last line
    moved = [a if not a.startswith("out=") else f"out={run}" for a in args]
    capsys.readouterr()
    assert main(["train", "--quiet", str(base / "c.yaml"), *moved, "steps=4", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "step-000003" in err and "falling back to an earlier checkpoint" in err and "Traceback" not in err
    assert "metrics.jsonl:4: not a whole metrics record" in err
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one line per step: the old step 3 was after the resumed checkpoint
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["corrupt-step-000003", "step-000001", "step-000002", "step-000003", "step-000004"]
    from raymeta.run.checkpoint import verify_checkpoint

    assert verify_checkpoint(run / "checkpoints" / "step-000004") is None


def test_resume_with_no_valid_checkpoint_is_one_line(trained, tmp_path, capsys):
    import shutil

    base, args = trained
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    for ck in (run / "checkpoints").iterdir():
        (ck / "state.json").write_text("{}")
    moved = [a if not a.startswith("out=") else f"out={run}" for a in args]
    err = _refused(capsys, ["train", "--quiet", str(base / "c.yaml"), *moved, "steps=4", "--resume"])
    assert "no checkpoint verifies (step-000003: state.json is missing or unreadable; step-000002" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002", "step-000003"]


def test_one_run_per_folder_stale_locks_and_orphans(trained, tmp_path, capsys):
    import shutil
    import socket
    import subprocess
    import sys

    from raymeta.run.lock import LOCK

    base, args = trained
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    moved = [a if not a.startswith("out=") else f"out={run}" for a in args]
    argv = ["train", "--quiet", str(base / "c.yaml"), *moved, "steps=4", "--resume"]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live process of this host holds the folder: refused, nothing touched
        owner = {"host": socket.gethostname(), "pid": live.pid, "started": "then"}
        (run / LOCK).write_text(json.dumps(owner))
        err = _refused(capsys, argv)
        assert f"another raymeta run is using this folder (pid {live.pid}" in err
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    finally:
        live.kill()
        live.wait()
    # the same lock once its process is gone is stale: taken over; what killed writes left is removed
    (run / "checkpoints" / ".step-000004.tmp-4242").mkdir()
    (run / "checkpoints" / ".step-000004.tmp-4242" / "model.safetensors").write_bytes(b"x" * 4096)
    (run / ".metrics.jsonl.abc123.tmp").write_text("half")
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "a stale lock of a process that is gone" in err and "interrupted writes left behind" in err
    leftovers = [p.name for p in [*run.iterdir(), *(run / "checkpoints").iterdir()] if p.name.startswith(".")]
    assert leftovers == []  # orphans gone, and the lock released at the end
    # a lock of another host cannot be checked from here: refused, naming the file to delete
    (run / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
    err = _refused(capsys, [*argv[:-2], "steps=5", "--resume"])
    assert "pid 1 on elsewhere" in err and f"delete {run / LOCK}" in err
