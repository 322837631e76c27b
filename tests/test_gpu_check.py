"""`scripts/gpu_check.py` (`agents.check`): the whole chain runs at tiny sizes on the CPU and reports every stage; a
failure fails it."""

import re
from pathlib import Path

import pytest
from conftest import run_script

from agents.check import GpuCheckConfig, gpu_check
from vit.data import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
STAGES = [
    "data",
    "supernet training",
    "env steps/s, 8 sub-envs",
    "env steps/s, 32 sub-envs",
    "PPO",
    "calibration",
    "evaluate.py",
    "benchmark.py fp32",
    "benchmark.py bf16",
]


def stages(table: str) -> dict[str, tuple[str, float]]:
    """The rows of a check's table: stage -> (result, seconds)."""
    rows = re.findall(r"^\| (.+?) \| (.+?) \| ([\d.]+) \|$", table, re.M)
    return {stage: (text, float(seconds)) for stage, text, seconds in rows}


def stage(rows: dict, prefix: str) -> str:
    """The result of the one stage whose name starts with `prefix`."""
    (found,) = [text for name, (text, _) in rows.items() if name.startswith(prefix)]
    return found


def numbers(text: str) -> list[float]:
    """Every number in `text`."""
    return [float(n) for n in re.findall(r"\d+(?:\.\d+)?", text)]


def after(text: str, label: str) -> float:
    """The number that follows `label` in `text`."""
    return float(re.search(re.escape(label) + r" ([\d.]+)", text).group(1))


@pytest.mark.long
def test_tiny_check_runs_every_stage_and_passes(tmp_path):
    result = run_script("gpu_check.py", "--device", "cpu", "--tiny", "--out", str(tmp_path), check=False)
    rows = stages(result.stdout.split("## gpu check", 1)[1])
    assert result.returncode == 0, rows
    for name in STAGES:
        assert stage(rows, name).startswith("ok:"), (name, rows)
    assert all(seconds >= 0 for _, seconds in rows.values())
    terminal, delta = numbers(stage(rows, "env steps/s, 32"))[:2]
    assert terminal > delta > 0  # the Result-to-Go completion costs forward passes
    evaluated = stage(rows, "evaluate.py")
    top1, top5, ratio = (after(evaluated, label) for label in ("Top-1", "Top-5", "MACs ratio"))
    params, full_params = (float(n) for n in re.findall(r"([\d.]+) M", evaluated))
    assert 0 <= top1 <= top5 <= 1 and 0 < ratio < 1 and 0 < params < full_params
    for precision in ("fp32", "bf16"):
        batch, full, static, adaptive = numbers(stage(rows, f"benchmark.py {precision}"))[:4]
        assert batch == 32 and min(full, static, adaptive) > 0
    assert (tmp_path / "gpu_check.md").read_text().count("| ok:") == len(STAGES)


@pytest.mark.long
def test_a_failing_stage_fails_the_check_and_the_rest_still_run(tmp_path):
    data = write_image_folder(tmp_path / "data", classes=4, per_class={"train": 16, "val": 8}, side=32)
    (data / "train" / "class0" / "0.jpg").write_bytes(b"not a jpeg")  # the env stages read every training image
    cfg = GpuCheckConfig(tiny=True, data_dir=str(data), device="cpu", seed=1, out=str(tmp_path / "out"))
    assert not gpu_check(cfg)
    rows = stages((tmp_path / "out" / "gpu_check.md").read_text())
    assert stage(rows, "env steps/s, 32").startswith("FAILED: UnidentifiedImageError")
    assert len(rows) == len(STAGES) and stage(rows, "data").startswith("ok:")
    assert stage(rows, "PPO") and stage(rows, "benchmark.py bf16")  # the stages after the failure ran or said why
