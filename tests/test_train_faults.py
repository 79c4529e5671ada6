"""Training runs that were interrupted or damaged: a torn last log line, a truncated or
corrupted newest checkpoint, garbage ``trainer.json``, a kill while ``best/`` is being
replaced, and a full disk (ENOSPC at the OS calls, in-process). Each ends in a resume
that works or a typed error -- never a traceback, never lost checkpoints."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from lisa_kit.errors import CheckpointError, TrainingError
from lisa_kit.train import checkpointing as ckpt

RECIPE = "lisa-tiny-synthetic"
QUICK = ["train.warmup_steps=2", "train.batch_size=2", "train.grad_accumulation=2", "train.val=null",
         "train.workers=0", "data.samples_per_epoch=10", "data.sources.synthetic.options.size=50"]
OV = QUICK + ["train.steps=8", "train.save_every=1", "train.keep_last=3"]



def _trainer(run: Path, **kw):
    from lisa_kit.train.loop import Trainer

    return Trainer(RECIPE, run, overrides=OV, progress=False, **kw)


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "train.jsonl").read_text().splitlines()]


@pytest.fixture
def run3(tmp_path, one_thread) -> Path:
    """A run stopped after step 3, checkpoints of steps 1, 2 and 3."""
    run = tmp_path / "run"
    _trainer(run, stop_after=3).fit()
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [1, 2, 3]
    return run


def test_torn_last_log_line_is_dropped_on_resume(run3):
    log = run3 / "train.jsonl"
    with open(log, "a") as f:  # a kill in the middle of step 4's line
        f.write('{"step": 4, "loss": 0.51')
    with pytest.warns(UserWarning, match=r"train\.jsonl: dropped 1 unreadable line\(s\) \(line 4"):
        tr = _trainer(run3, resume=run3, stop_after=5)
        tr.fit()
    assert _steps(run3) == [1, 2, 3, 4, 5]
    assert all(line.endswith("}") for line in log.read_text().splitlines())


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_newest_checkpoints_fall_back_to_the_previous_intact_one(run3, capsys):
    from lisa_kit.cli import main

    root = run3 / "checkpoints"
    weights = root / "step_000003" / ckpt.WEIGHTS_FILE
    with open(weights, "r+b") as f:  # truncated: the disk filled or the copy stopped
        f.truncate(weights.stat().st_size // 2)
    state = root / "step_000002" / ckpt.STATE_FILE
    _flip_byte(state, state.stat().st_size // 2)  # same size, different bytes
    manifest = json.loads((root / "step_000001" / ckpt.MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {ckpt.WEIGHTS_FILE, ckpt.STATE_FILE, ckpt.RNG_FILE, ckpt.RECIPE_FILE,
                                      ckpt.META_FILE}

    with pytest.warns(UserWarning) as caught:
        tr = _trainer(run3, resume=run3)
    said = [str(w.message) for w in caught]
    assert any("step_000003 is damaged" in s and "truncated" in s and ckpt.WEIGHTS_FILE in s for s in said), said
    assert any("step_000002 is damaged" in s and "sha256" in s and ckpt.STATE_FILE in s for s in said), said
    assert any(f"resuming from {root / 'step_000001'}" in s for s in said), said
    assert tr.step == 1 and tr.resumed_from == root / "step_000001"
    assert f"resumed from {root / 'step_000001'}: step 1" in capsys.readouterr().err

    # naming the damaged checkpoint itself is an error that says what is wrong
    with pytest.raises(CheckpointError, match=r"truncated.*trainable\.safetensors"):
        _trainer(run3, resume=root / "step_000003")
    # the exported model is read from a checkpoint too: damage is an error, not a model
    with pytest.raises(CheckpointError, match="sha256"):
        ckpt.load_trained_model(root / "step_000002")
    # resuming for real: the damaged ones are set aside (not pruned in place of intact ones)
    # and rewritten by the replayed steps
    tr.stop_after = 3
    with pytest.warns(UserWarning, match="renamed to step_000003.damaged"):
        tr.fit()
    for step in (2, 3):
        ckpt.verify_checkpoint(root / ckpt.step_name(step))
    assert (root / "step_000002.damaged").is_dir() and (root / "step_000003.damaged").is_dir()
    assert main(["train", "--resume", str(root / "step_000003"), "--no-progress", "--stop-after", "3"]) == 0


def test_garbage_trainer_json_is_passed_over_or_a_typed_error(run3, capsys):
    from lisa_kit.cli import main

    root = run3 / "checkpoints"
    (root / "step_000003" / ckpt.META_FILE).write_text("{garbage")
    with pytest.warns(UserWarning, match=r"step_000003 is damaged"):
        assert _trainer(run3, resume=run3).step == 2

    # a format-1 checkpoint (no manifest) with a garbage trainer.json: the same
    for ck in (root / "step_000001", root / "step_000002"):
        (ck / ckpt.MANIFEST_FILE).unlink()
        (ck / ckpt.META_FILE).write_text('{"format": 1, "step": "two", "epoch": 0, "position": 4}'
                                         if ck.name.endswith("2") else "\x00\x01")
    capsys.readouterr()
    assert main(["train", "--resume", str(run3), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: nothing to resume") and "Traceback" not in err
    assert "step_000001" in err and "step_000002" in err and "step_000003" in err


def _kill_between_renames(monkeypatch):
    """``os.replace`` in checkpointing dies on its second call: the old checkpoint was
    renamed aside, the new one not yet in."""
    real = os.replace

    def replace(src, dst):
        if Path(src).name == f"{ckpt.BEST}.tmp":
            raise KeyboardInterrupt("killed")
        return real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)


@pytest.mark.parametrize("new_intact", [True, False])
def test_kill_while_best_is_replaced_keeps_a_best(run3, monkeypatch, new_intact):
    tr = _trainer(run3, resume=run3, stop_after=3)
    tr.best_giou = 0.25
    tr.save(ckpt.BEST)
    tr.best_giou = 0.5
    with monkeypatch.context() as m:
        _kill_between_renames(m)
        with pytest.raises(KeyboardInterrupt):
            tr.save(ckpt.BEST)
    root = run3 / "checkpoints"
    assert not (root / "best").exists() and (root / "best.old").is_dir() and (root / "best.tmp").is_dir()
    if not new_intact:
        _flip_byte(root / "best.tmp" / ckpt.STATE_FILE, 10)

    with pytest.warns(UserWarning, match="best: (completed the replacement|restored the previous version)"):
        _trainer(run3, resume=run3, stop_after=3).fit()  # a trainer starting on the run recovers best/
    assert sorted(p.name for p in root.iterdir()) == ["best", "step_000001", "step_000002", "step_000003"]
    assert ckpt.read_checkpoint(root / "best").meta["best_giou"] == (0.5 if new_intact else 0.25)


def _full_disk(monkeypatch, under: Path, calls=("write", "fsync")):
    """ENOSPC from ``os.write``/``os.fsync`` on files below ``under`` (their paths read
    from /proc/self/fd): the calls at which a full disk shows."""
    def failing(name):
        real = getattr(os, name)

        def call(fd, *args):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if target == str(under) or target.startswith(str(under) + os.sep):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, *args)
        return call

    for name in calls:
        monkeypatch.setattr(os, name, failing(name))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_full_disk_is_a_typed_error_and_the_last_checkpoint_survives(run3, monkeypatch):
    root = run3 / "checkpoints"
    # the checkpoint of step 4 does not fit
    with monkeypatch.context() as m:
        _full_disk(m, root)
        tr = _trainer(run3, resume=run3)
        with pytest.raises(TrainingError) as caught:
            tr.fit()
    msg = str(caught.value)
    assert msg.startswith("the disk is full: cannot write the checkpoint step_000004 of step 4")
    assert f"{root / 'step_000004.tmp'}" in msg and f"previous checkpoint {root / 'step_000003'} (step 3) is intact" \
        in msg
    assert sorted(p.name for p in root.iterdir()) == ["step_000001", "step_000002", "step_000003"]  # no leftover
    ckpt.verify_checkpoint(root / "step_000003")

    # the log line of step 4 does not fit (the checkpoints would)
    with monkeypatch.context() as m:
        _full_disk(m, run3 / "train.jsonl")
        with pytest.raises(TrainingError, match=r"the disk is full: cannot write train\.jsonl .*step_000003 \(step 3\) "
                                                r"is intact"):
            _trainer(run3, resume=run3).fit()
    assert _steps(run3) == [1, 2, 3]

    # space again: the run goes on from step 3
    out = _trainer(run3, resume=run3, stop_after=4).fit()
    assert out["step"] == 4 and _steps(run3) == [1, 2, 3, 4]


def _can_mount_tmpfs(where: Path) -> bool:
    """A private mount namespace with a tmpfs (root or unprivileged user namespaces)."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    where.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"],
                           capture_output=True)
    return probe.returncode == 0


def test_really_full_disk_during_save(tmp_path, one_thread, capsys):
    """A real full filesystem (a tmpfs sized for 1.5 checkpoints, in a private mount
    namespace): safetensors and torch.save report ENOSPC in their own exception types;
    it is still the typed error, and the previous checkpoint is intact."""
    import subprocess
    import sys

    from lisa_kit.cli import main

    mnt = tmp_path / "mnt"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs in a private mount namespace here")
    ov = QUICK + ["train.steps=3", "train.save_every=1"]
    probe = tmp_path / "probe"
    from lisa_kit.train.loop import Trainer

    Trainer(RECIPE, probe, overrides=ov, stop_after=1, progress=False).fit()
    one = sum(f.stat().st_size for f in probe.rglob("*") if f.is_file())
    size_k = int(1.5 * one) // 1024  # the run files and one checkpoint fit, a second checkpoint does not

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                          os.environ.get("PYTHONPATH", "")])}
    run, copy = mnt / "run", tmp_path / "copy"
    train = " ".join([sys.executable, "-m", "lisa_kit", "train", RECIPE, *ov, "--out", str(run), "--no-progress",
                      "--device", "cpu"])
    script = f"mount -t tmpfs -o size={size_k}k tmpfs {mnt} && {{ {train}; rc=$?; cp -a {run} {copy}; exit $rc; }}"
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (f"error: the disk is full: cannot write the checkpoint step_000002 of step 2 "
            f"({run / 'checkpoints/step_000002.tmp'}") in proc.stderr, proc.stderr[-3000:]
    assert f"the previous checkpoint {run / 'checkpoints/step_000001'} (step 1) is intact" in proc.stderr
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["step_000001"]
    ckpt.verify_checkpoint(copy / "checkpoints/step_000001")
    capsys.readouterr()
    assert main(["train", "--resume", str(copy), "--no-progress", "--device", "cpu"]) == 0
    assert "resumed from" in capsys.readouterr().err and _steps(copy) == [1, 2, 3]


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")) \
    + "model: *i\n"  # 9**9 strings once expanded: memory would run out long before a model is built


def test_alias_bomb_recipe_in_a_checkpoint_is_refused_on_resume_and_export(run3):
    """A checkpoint's recipe.yaml (someone else's run, a tampered copy) goes through the
    bounded recipe loader: a typed error before anything is expanded. The manifest is
    rewritten to match, so the refusal comes from the YAML, not the hash."""
    import hashlib

    from lisa_kit.errors import RecipeError

    root = run3 / "checkpoints"
    for ck in (root / ckpt.step_name(s) for s in (1, 2, 3)):
        (ck / ckpt.RECIPE_FILE).write_text(ALIAS_BOMB)
        manifest_path = ck / ckpt.MANIFEST_FILE
        manifest = json.loads(manifest_path.read_text())
        data = ALIAS_BOMB.encode()
        manifest["files"][ckpt.RECIPE_FILE] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest_path.write_text(json.dumps(manifest))
    from lisa_kit.train.loop import Trainer

    with pytest.raises(RecipeError, match="alias|nodes"):
        Trainer(None, run3, resume=run3, progress=False)
    with pytest.raises(RecipeError, match="alias|nodes"):
        ckpt.load_trained_model(root / ckpt.step_name(3))
