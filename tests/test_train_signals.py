"""Stopping training with a signal: SIGTERM/SIGINT write a checkpoint at the step boundary
and exit 143/130, ``--resume`` says where it goes on and replays exactly, a repeated
signal does not break the checkpoint, and under torchrun every rank stops at the same
step (CPU, tiny recipe; real processes and real signals)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lisa_kit
from lisa_kit.train import checkpointing as ckpt
from lisa_kit.train.signals import exit_code

RECIPE = "lisa-tiny-synthetic"
REPO = Path(lisa_kit.__file__).resolve().parent.parent
# as tests/test_train.py: 10 samples per epoch, 2 x 2 per step (epoch boundaries inside the run)
QUICK = ["train.warmup_steps=2", "train.batch_size=2", "train.grad_accumulation=2", "train.val=null",
         "train.workers=0", "data.samples_per_epoch=10", "data.sources.synthetic.options.size=50"]
STEPS = 12  # ~0.3 s a step on one core: the signal, sent after step 2 is logged, lands well before the end
POLL_S = 0.02
WAIT_S = 240



def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]


@pytest.fixture
def spawn():
    """``Popen`` in a new session; whatever is left of it is killed at the end."""
    procs = []

    def start(cmd, cwd):
        proc = subprocess.Popen(cmd, env=_env(), cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def _wait_for_steps(run: Path, proc: subprocess.Popen, n: int) -> None:
    """Until ``run/train.jsonl`` has ``n`` lines (the run is inside its loop)."""
    deadline = time.monotonic() + WAIT_S
    log = run / "train.jsonl"
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before step {n}: {proc.stderr.read()[-3000:]}")
        time.sleep(POLL_S)
    pytest.fail(f"no step {n} within {WAIT_S} s")


def _compare(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for ra, rb in zip(a, b):
        for key in ("loss", "ce", "bce", "dice", "lr", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-7), (ra["step"], key)


def test_sigterm_then_resume_replays_an_uninterrupted_run(tmp_path, one_thread, capsys, spawn):
    from lisa_kit.cli import main
    from lisa_kit.train.loop import Trainer

    ov = QUICK + [f"train.steps={STEPS}", "train.save_every=0"]
    cut = tmp_path / "cut"
    proc = spawn([sys.executable, "-m", "lisa_kit", "train", RECIPE, *ov, "--out", str(cut), "--no-progress",
                  "--device", "cpu"], tmp_path)
    _wait_for_steps(cut, proc, 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 143, err[-3000:]

    m = re.search(r"stopped by SIGTERM at step (\d+) \(epoch (\d+), sample (\d+) .*checkpoint (\S+);", err)
    assert m, err[-3000:]
    step = int(m.group(1))
    assert 2 <= step < STEPS  # mid-run, not at its end
    saved = cut / "checkpoints" / ckpt.step_name(step)
    assert Path(m.group(4)) == saved and json.loads(out)["signal"] == "SIGTERM"
    data = ckpt.read_checkpoint(saved)  # complete and matching its manifest
    assert data.meta["step"] == step and (data.meta["epoch"], data.meta["position"]) == \
        (int(m.group(2)), int(m.group(3)))
    assert [r["step"] for r in _log(cut)] == list(range(1, step + 1))

    capsys.readouterr()
    assert main(["train", "--resume", str(cut), "--no-progress", "--device", "cpu"]) == 0
    said = capsys.readouterr().err
    assert f"resumed from {saved}: step {step}, epoch {m.group(2)}, sample {m.group(3)} of the epoch" in said

    Trainer(RECIPE, tmp_path / "full", overrides=ov, progress=False, device="cpu").fit()
    _compare(_log(tmp_path / "full"), _log(cut))
    wa = ckpt.read_checkpoint(tmp_path / "full/checkpoints" / ckpt.step_name(STEPS)).weights
    wb = ckpt.read_checkpoint(cut / "checkpoints" / ckpt.step_name(STEPS)).weights
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)


def _signal_at(monkeypatch, step: int, signum: int, during_save: int = 0):
    """Real signals to this process: one at the end of optimizer step ``step``, then
    ``during_save`` more while the checkpoint is being written (after its first file)."""
    from lisa_kit.train.loop import Trainer

    real_step, real_write = Trainer.train_step, ckpt._write_torch
    sent = {"stop": False}

    def train_step(self, *a, **k):
        out = real_step(self, *a, **k)
        if out["step"] == step and not out.get("skipped"):
            os.kill(os.getpid(), signum)
            sent["stop"] = True
        return out

    def write(obj, path):
        if sent["stop"] and path.name == ckpt.STATE_FILE:  # the save that the stop asked for
            for _ in range(during_save):
                os.kill(os.getpid(), signum)
        return real_write(obj, path)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(ckpt, "_write_torch", write)


def test_second_signal_while_saving_keeps_the_checkpoint_third_aborts(tmp_path, monkeypatch, one_thread, capfd):
    from lisa_kit.train.loop import Trainer
    from lisa_kit.train.signals import Interrupted

    ov = QUICK + ["train.steps=8", "train.save_every=2"]
    previous = signal.getsignal(signal.SIGINT)
    _signal_at(monkeypatch, 3, signal.SIGINT, during_save=1)
    run = tmp_path / "run"
    summary = Trainer(RECIPE, run, overrides=ov, progress=False).fit()
    assert (summary["step"], summary["signal"], summary["exit_code"]) == (3, "SIGINT", 130)
    err = capfd.readouterr().err
    assert "SIGINT received: stopping" in err and "SIGINT received again" in err
    assert ckpt.read_checkpoint(run / "checkpoints/step_000003").meta["step"] == 3
    assert signal.getsignal(signal.SIGINT) is previous  # handlers restored after fit()

    # the third signal aborts inside the save: the previous checkpoint stays the newest
    _signal_at(monkeypatch, 5, signal.SIGINT, during_save=2)
    with pytest.raises(Interrupted) as caught:
        Trainer(RECIPE, run, overrides=ov, resume=run, progress=False).fit()
    assert caught.value.signum == signal.SIGINT
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [3, 4]  # step 4: save_every
    assert not (run / "checkpoints/step_000005").exists() and (run / "checkpoints/step_000005.tmp").is_dir()
    assert signal.getsignal(signal.SIGINT) is previous
    monkeypatch.undo()
    assert Trainer(RECIPE, run, overrides=ov, resume=run, progress=False).step == 4


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _worker_of_rank(launcher: int, rank: int) -> int | None:
    for pid in _children(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the workers")
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, one_thread, spawn):
    """SIGTERM to rank 1 alone: the stop flag is all-reduced at the step boundary, so rank
    0 stops at the same step and writes the checkpoint (no rank left in a collective)."""
    ov = QUICK + [f"train.steps={STEPS}", "train.save_every=0", "train.strategy=ddp", "train.lora.dropout=0.0"]
    run = tmp_path / "ddp"
    proc = spawn([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                  "lisa_kit", "train", RECIPE, *ov, "--out", str(run), "--no-progress", "--device", "cpu"], tmp_path)
    _wait_for_steps(run, proc, 2)
    rank1 = _worker_of_rank(proc.pid, 1)
    assert rank1 is not None
    os.kill(rank1, signal.SIGTERM)
    out, err = proc.communicate(timeout=WAIT_S)
    m = re.search(r"stopped by SIGTERM at step (\d+)", err)
    assert m, err[-4000:]
    step = int(m.group(1))
    assert step < STEPS
    data = ckpt.read_checkpoint(run / "checkpoints" / ckpt.step_name(step))
    assert data.meta["step"] == step and data.meta["world_size"] == 2 and len(data.rng) == 2
    assert [r["step"] for r in _log(run)] == list(range(1, step + 1))
    # torchrun's per-rank report: every worker ended through the stop (143), the one still
    # exiting when the launcher saw the other end too (its SIGTERM is ignored by then)
    codes = re.findall(r"exitcode\s*:\s*(-?\d+) \(pid", err)
    assert codes and set(codes) == {str(exit_code(signal.SIGTERM))}, err[-4000:]
