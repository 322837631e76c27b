"""The memory benchmark runs end to end on a tiny configuration and reports figures consistent with its series."""

import json
from pathlib import Path

import pytest
import torch
from conftest import run_script

import vit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fmnist_weights(tmp_path_factory) -> Path:
    """Random weights of the prance_fmnist preset, standing in for a trained checkpoint."""
    torch.manual_seed(0)
    return vit.save_checkpoint(vit.create_supernet("prance_fmnist"), tmp_path_factory.mktemp("w") / "w.safetensors")


def test_benchmark_memory_reports_rss_per_episode(tmp_path, fmnist_dir, fmnist_weights):
    args = ["--checkpoint", str(fmnist_weights), "--data-dir", str(fmnist_dir), "--num-envs", "4"]
    args += ["--episodes", "3", "--reward", "delta", "--trim", "--device", "cpu", "--out", str(tmp_path)]
    result = run_script("benchmark_memory.py", *args)
    name = "memory"
    report = (tmp_path / f"{name}.md").read_text()
    assert report.strip() in result.stdout and "| after episode 3 |" in report and "within the limit" in report
    assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG")

    record = json.loads((tmp_path / f"{name}.json").read_text())
    episodes = record["episodes"]
    rss, trimmed = [row["rss_mib"] for row in episodes], [row["trimmed_mib"] for row in episodes]
    assert [row["episode"] for row in episodes] == [1, 2, 3]
    assert 50 < rss[0] < record["limit_mib"]  # a Python process with torch holds tens of MiB at least
    assert record["rss_after_episode_mib"] == {"1": rss[0], "3": rss[2]}
    assert record["growth_mib"] == pytest.approx(rss[2] - rss[0])  # from episode 1: fewer than 5 episodes
    assert record["late_growth_mib"] == pytest.approx(rss[2] - rss[0])
    assert record["trimmed_growth_mib"] == pytest.approx(trimmed[2] - trimmed[0])
    assert all(t <= r + 1 for t, r in zip(trimmed, rss))  # trimming only returns memory
    assert record["peak_rss_mib"] >= max(rss) and record["within_limit"]
