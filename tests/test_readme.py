"""Every code block of the README runs, at tiny sizes, so that the README cannot drift from the code.

The Python blocks run in order as one program (later blocks use what earlier ones made), on generated Fashion-MNIST
files. Each command of the shell blocks runs as written, in one scratch folder (so later commands find what earlier
ones wrote), with the options of `TINY` appended (argparse keeps the last value of an option, so they only shrink the
work), DeiT shapes at 32 px, a generated ImageFolder for ImageNet, and the CPU for CUDA. `make` targets are checked
with a dry run: `make test` is this suite, and `make demo` is the measured job.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# options appended to each script's command line: small data, few steps, one thread
PPO = ["--num-envs", "8", "--n-steps", "11", "--minibatch-size", "44", "--images", "8"]
TINY = {
    "train_supernet.py": ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "8", "--eval-batches", "1"],
    "train_selector.py": [*PPO, "--total-steps", "88", "--eval-every", "88"],
    "evaluate.py": ["--images", "16", "--calib-images", "8", "--batch-size", "16", "--budgets", "0.5"],
    "visualize.py": ["--images", "4"],
    "benchmark.py": ["--batch-size", "8", "--calib-images", "8", "--rounds", "1", "--supernet-batch-size", "2"],
    "ablate_rtg.py": [*PPO, "--steps", "88", "--every", "88", "--seeds", "0", "--calib-images", "8"],
    "reinforce_example.py": ["--episodes", "2", "--images", "8"],
    "eval_supernet.py": ["--images", "8", "--batch-size", "8"],
    "benchmark_supernet.py": ["--batch-size", "8", "--repeats", "1"],
    "benchmark_env.py": ["--num-envs", "4", "--repeats", "1"],
    "finetune.py": ["--steps", "2", "--batch-size", "8", "--images", "8", "--selector-steps", "88", "--num-envs", "8"],
}
IMAGENET = "/data/imagenet"  # the README's ImageFolder, replaced by a generated one
SMALL_IMAGES = ["--img-size", "32"]  # DeiT shapes at 32 px: 4 patch tokens


def blocks(language: str) -> list[str]:
    """The README's fenced code blocks of `language`, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def commands(block: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    text = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if shlex.split(line, comments=True)]


def run(args: list[str], cwd: Path, env: dict, timeout: int = 600) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert result.returncode == 0, f"{shlex.join(args)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A two-class ImageFolder of small JPEGs standing in for ImageNet (the transforms resize them)."""
    return write_image_folder(tmp_path / "imagenet", classes=2, per_class={"train": 4, "val": 2}, size=40)


@pytest.fixture
def env(fmnist_dir) -> dict:
    return {**os.environ, "FASHION_MNIST_DIR": str(fmnist_dir), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_the_readme_has_python_and_shell_blocks():
    assert len(blocks("python")) >= 4 and len(blocks("bash")) >= 3


@pytest.mark.long
def test_python_blocks_run(tmp_path, env):
    program = "\n\n".join(blocks("python"))
    (tmp_path / "readme.py").write_text(program)
    run([sys.executable, "readme.py"], tmp_path, env)


@pytest.mark.long
def test_shell_blocks_run(tmp_path, env, image_folder):
    seen = set()
    for block in blocks("bash"):
        for args in commands(block):
            if args[0] == "make":
                run(["make", "-n", *args[1:]], ROOT, env)
                continue
            script = next(a for a in args if a.startswith("scripts/"))
            name = Path(script).name
            seen.add(name)
            rest = args[args.index(script) + 1 :]
            rest = ["cpu" if a == "cuda" else str(image_folder) if a == IMAGENET else a for a in rest]
            small = SMALL_IMAGES if any(a.startswith("prance_deit") for a in rest) else []
            run([sys.executable, str(ROOT / script), *rest, *TINY.get(name, []), *small], tmp_path, env)
    assert seen == {p.name for p in (ROOT / "scripts").glob("*.py")} - {"benchmark_memory.py", "gpu_check.py"}
