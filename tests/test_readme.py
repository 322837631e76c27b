"""Every code block of the README and of the docs pages runs, at tiny sizes, so that neither can drift from the code.

Each Python block of the README runs alone, as a reader copies it; the Python blocks of a docs page run in order as
one program (later blocks use what earlier ones made); all on generated Fashion-MNIST files. The docs build as a
site with warnings as errors. Each command of the shell blocks (the README's, then the pages') runs as written, in
one scratch folder (so later commands find what earlier ones wrote), with the options of `TINY` appended (argparse
keeps the last value of an option, so they only shrink the work), DeiT shapes at 32 px, a generated ImageFolder for
ImageNet, and the CPU for CUDA. `make` targets are checked with a dry run: `make test` is this suite, and
`make demo` is the measured job.
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
# the docs pages in the site's order (mkdocs.yml's nav), each a file of docs/
NAV = re.findall(r"^\s+- [^:]+: (\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
PAGES = {name: (ROOT / "docs" / name).read_text() for name in NAV}

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
    "leaderboard.py": [
        "--algos",
        "ppo",
        "--rewards",
        "delta",
        "--no-one-shot",
        "--seeds",
        "0",
        "--steps",
        "88",
        "--decisions",
        "per-block",
        "--budgets",
        "0.3",
        "0.5",
        "--images",
        "16",
        "--no-heuristics",
        "--no-shipped",
    ],
    "finetune.py": ["--steps", "2", "--batch-size", "8", "--images", "8", "--selector-steps", "88", "--num-envs", "8"],
}
IMAGENET = "/data/imagenet"  # the README's ImageFolder, replaced by a generated one
SMALL_IMAGES = ["--img-size", "32"]  # DeiT shapes at 32 px: 4 patch tokens


def blocks(language: str, text: str = README) -> list[str]:
    """The fenced code blocks of `language` of a Markdown text (the README's by default), in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


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


def test_the_readme_is_short_and_has_python_and_shell_blocks():
    assert len(README.splitlines()) <= 300
    assert len(blocks("python")) >= 3 and len(blocks("bash")) >= 2
    assert set(NAV) == {p.name for p in (ROOT / "docs").glob("*.md")}  # every page is in the site


@pytest.mark.long
@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_each_readme_python_block_runs_alone(tmp_path, env, index):
    (tmp_path / "block.py").write_text(blocks("python")[index])
    run([sys.executable, "block.py"], tmp_path, env)


@pytest.mark.long
@pytest.mark.parametrize("page", [name for name in NAV if blocks("python", PAGES[name])])
def test_each_docs_page_s_python_blocks_run(tmp_path, env, page):
    (tmp_path / "page.py").write_text("\n\n".join(blocks("python", PAGES[page])))
    run([sys.executable, "page.py"], tmp_path, env)


def test_the_docs_build_with_no_warning(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    args = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")]
    run(args, ROOT, env, timeout=120)
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "supernet" / "index.html").is_file()


@pytest.mark.long
def test_shell_blocks_run(tmp_path, env, image_folder):
    seen = set()
    for block in blocks("bash") + [b for name in NAV for b in blocks("bash", PAGES[name])]:
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
