"""Training killed with SIGKILL mid-run resumes from its last checkpoint and loses at most one checkpoint interval.

Each run is the real script in a subprocess, killed either at an arbitrary point of training or while it is writing
a checkpoint (a write hooked to stop half way, so the kill is certain to land there), then started again with
`--resume`.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import vit
from agents.selector import load_selector
from agents.training import latest_checkpoint
from vit.checkpoint import atomic_write, read_state_dict, read_train_state
from vit.train import TRAIN_FORMAT

ROOT = Path(__file__).resolve().parents[1]
# one thread, and a progress line at every update: the test reads how far a run got from its progress bar
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"}
TIMEOUT = 300  # seconds for any run or wait: generous, as the machine may be shared

# Runs a script with one writer function hooked: its `call`-th call writes, truncates what it wrote to half, creates
# `marker` and hangs, so that the SIGKILL that follows lands in the middle of writing a checkpoint.
STALLED_WRITE = """
import importlib, os, runpy, sys, time

module, name, path_arg, call, marker, script, *args = sys.argv[1:]
owner = importlib.import_module(module)
write, calls = getattr(owner, name), []

def stalled(*a, **kw):
    calls.append(1)
    result = write(*a, **kw)
    if len(calls) == int(call):
        path = str(a[int(path_arg)])
        os.truncate(path, os.path.getsize(path) // 2)
        open(marker, "w").close()
        time.sleep(3600)
    return result

setattr(owner, name, stalled)
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
"""


class Run:
    """A script running in a subprocess, its stdout and stderr in files of `folder`; killed on leaving a `with`."""

    def __init__(self, folder: Path, name: str, script: str, args: list[str], stall: tuple | None = None) -> None:
        self.stdout, self.stderr = folder / f"{name}.out", folder / f"{name}.err"
        path = str(ROOT / "scripts" / script)
        cmd = [sys.executable, path, *args]
        if stall is not None:
            self.marker = folder / f"{name}.stalled"
            module, function, path_arg, call = stall
            cmd = [sys.executable, "-c", STALLED_WRITE, module, function, str(path_arg), str(call), str(self.marker)]
            cmd += [path, *args]
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=ENV)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:  # a failed test leaves no run behind (a stalled one would hang for an hour)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def progress(self, desc: str) -> int:
        """The last count printed by the progress bar `desc` (0 before its first line)."""
        counts = re.findall(rf"{re.escape(desc)}:\s+\d+%\|[^|]*\|\s*(\d+)/\d+", self.stderr.read_text())
        return int(counts[-1]) if counts else 0

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        """Poll `condition` while the run is alive; fail if it ends or the time runs out first."""
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            assert self.process.poll() is None, f"the run ended before {what}:\n{self.stderr.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {TIMEOUT} s"
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the run, which must still be running (a run that had already exited shows its exit status)."""
        assert self.process.poll() is None, "the run ended before it could be killed"
        os.kill(self.process.pid, signal.SIGKILL)
        assert self.process.wait(TIMEOUT) == -signal.SIGKILL, "the run had already exited when it was killed"

    def finish(self) -> str:
        """Wait for a successful end; returns stdout."""
        assert self.process.wait(TIMEOUT) == 0, self.stderr.read_text()[-3000:]
        return self.stdout.read_text()


def flags(**options) -> list[str]:
    """Command-line flags of a script: `--name value` for every option."""
    return [arg for name, value in options.items() for arg in (f"--{name.replace('_', '-')}", str(value))]


def leftovers(folder: Path) -> list[str]:
    """Temporary files of interrupted writes (hidden files) anywhere under `folder`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def test_the_next_write_removes_the_temporary_file_of_a_killed_one(tmp_path):
    path = tmp_path / "last.pt"
    (tmp_path / ".last.pt.k1ll3d_0.tmp").write_bytes(b"partial")  # as a write killed before its rename leaves it
    (tmp_path / ".supernet.safetensors.k1ll3d_0.tmp").write_bytes(b"partial")  # another file's: not this write's
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(b"whole"))
    assert path.read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".supernet.safetensors.k1ll3d_0.tmp", "last.pt"]


# --- supernet training: a checkpoint per epoch ------------------------------------------------------------------

EPOCHS, STEPS_PER_EPOCH = 3, 6


def supernet_args(data: Path, out: Path) -> list[str]:
    """A three-epoch run of six steps each, the sandwich rule from epoch 2 on."""
    options = dict(epochs=EPOCHS, batch_size=16, steps_per_epoch=STEPS_PER_EPOCH, eval_batches=1, num_random=1)
    options |= dict(largest_only_epochs=1, warmup_epochs=0.5, device="cpu", seed=0)
    return flags(data_dir=data, out=out, **options)


@pytest.fixture(scope="module")
def uninterrupted_supernet(fmnist_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final weights of the same supernet training run without interruption."""
    folder = tmp_path_factory.mktemp("straight")
    with Run(folder, "straight", "train_supernet.py", supernet_args(fmnist_dir, folder / "run")) as run:
        run.finish()
    return read_state_dict(folder / "run" / "supernet.safetensors")


@pytest.mark.long
@pytest.mark.parametrize("moment", ["training", "checkpoint_write"])
def test_supernet_training_killed_resumes_from_its_last_epoch(moment, fmnist_dir, tmp_path, uninterrupted_supernet):
    out = tmp_path / "run"
    last = out / "last.pt"
    args = supernet_args(fmnist_dir, out)
    stall = ("torch", "save", 1, 2) if moment == "checkpoint_write" else None  # epoch 2's last.pt
    with Run(tmp_path, "killed", "train_supernet.py", args, stall=stall) as run:
        if moment == "training":  # in the middle of epoch 2, a few steps after epoch 1's checkpoint
            run.wait_until(lambda: run.progress(f"epoch 2/{EPOCHS}") >= 2, "step 2 of epoch 2")
        else:
            run.wait_until(run.marker.exists, "the stalled write of epoch 2's checkpoint")
            assert leftovers(out), "the write to kill was not in progress"
        run.kill()

    completed = read_train_state(last, TRAIN_FORMAT)["epoch"]  # a checkpoint that reads: the kill did not break it
    assert completed == 1, "the killed run had completed another epoch: it was not killed in epoch 2"
    with Run(tmp_path, "resumed", "train_supernet.py", [*args, "--resume"]) as run:
        resumed = run.finish()
    assert f"resumed from {last} at epoch {completed}" in resumed
    assert [int(e) for e in re.findall(r"^epoch (\d+): Top-1", resumed, re.M)] == list(range(completed + 1, EPOCHS + 1))

    assert read_train_state(last, TRAIN_FORMAT)["epoch"] == EPOCHS
    final = read_state_dict(out / "supernet.safetensors")
    assert final.keys() == uninterrupted_supernet.keys()
    different = [k for k in final if not torch.equal(final[k], uninterrupted_supernet[k])]
    assert not different, f"weights differ from the uninterrupted run's: {different[:5]}"
    assert leftovers(out) == [], "temporary files of the killed run's writes were left behind"


# --- selector training: a checkpoint every `save_every` steps -------------------------------------------------------

NUM_ENVS, N_STEPS, SAVE_EVERY, TOTAL_STEPS = 8, 11, 176, 1760
ROLLOUT = NUM_ENVS * N_STEPS  # steps between two chances to save: checkpoints are written at rollout starts


@pytest.fixture(scope="module")
def fmnist_weights(tmp_path_factory) -> Path:
    """Random weights of the prance_fmnist preset, standing in for a trained checkpoint."""
    torch.manual_seed(0)
    return vit.save_checkpoint(vit.create_supernet("prance_fmnist"), tmp_path_factory.mktemp("w") / "w.safetensors")


def selector_args(weights: Path, data: Path, out: Path) -> list[str]:
    """Twenty rollouts of 88 steps, a checkpoint every second one, one evaluation at the end."""
    options = dict(num_envs=NUM_ENVS, n_steps=N_STEPS, minibatch_size=4 * N_STEPS, total_steps=TOTAL_STEPS)
    options |= dict(save_every=SAVE_EVERY, eval_every=10 * TOTAL_STEPS, images=NUM_ENVS, device="cpu", seed=0)
    return flags(checkpoint=weights, data_dir=data, out=out, **options)


def checkpoint_steps(folder: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(r"selector_(\d+)\.zip", p.name)))


@pytest.mark.long
@pytest.mark.parametrize("moment", ["training", "checkpoint_write"])
def test_selector_training_killed_resumes_from_its_newest_checkpoint(moment, fmnist_weights, fmnist_dir, tmp_path):
    out = tmp_path / "run"
    folder = out / "checkpoints"
    args = selector_args(fmnist_weights, fmnist_dir, out)
    stall = ("stable_baselines3.common.base_class", "save_to_zip_file", 0, 2) if moment == "checkpoint_write" else None
    with Run(tmp_path, "killed", "train_selector.py", args, stall=stall) as run:
        if moment == "training":  # in the middle of a rollout, a rollout after the first checkpoint
            run.wait_until(lambda: run.progress("selector") >= SAVE_EVERY + ROLLOUT + ROLLOUT // 2, "mid-interval")
        else:  # while the second checkpoint is being written
            run.wait_until(run.marker.exists, "the stalled write of the second checkpoint")
            assert leftovers(folder), "the write to kill was not in progress"
        run.kill()
        reached = run.progress("selector")

    saved = checkpoint_steps(folder)
    assert saved and saved[-1] < TOTAL_STEPS, "no checkpoint before the kill, or the run had ended"
    for path in folder.glob("selector_*.zip"):  # every checkpoint under its final name is whole
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() is None, path
    newest = latest_checkpoint(folder)
    assert newest == folder / f"selector_{saved[-1]}.zip"
    assert 0 <= reached - saved[-1] <= SAVE_EVERY + ROLLOUT, f"killed at {reached} steps, newest checkpoint {newest}"

    with Run(tmp_path, "resumed", "train_selector.py", [*args, "--resume"]) as run:
        assert f"resumed from {newest} at {saved[-1]} steps" in run.finish()
        assert run.progress("selector") == TOTAL_STEPS

    model, settings = load_selector(out / "selector", device="cpu")
    assert model.num_timesteps == TOTAL_STEPS and settings["config"]["total_steps"] == TOTAL_STEPS
    assert checkpoint_steps(folder)[-1] == TOTAL_STEPS
    assert json.loads((out / "eval_history.json").read_text())[-1]["steps"] == TOTAL_STEPS
    assert leftovers(out) == [], "temporary files of the killed run's writes were left behind"
