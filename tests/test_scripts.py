"""Every script runs end to end on a tiny configuration, once, as a user would start it, and speaks the shared
vocabulary in `--help`; the other checks call the package functions behind the scripts and read what they return."""

import json
import math
import re
import runpy
from pathlib import Path

import pytest
import timm
import torch
from conftest import images, run_script

import agents
import vit
from agents.ablation import AblationConfig, ablate_rtg
from agents.report import EvaluateConfig, evaluate_selector
from prance_env.bench import EnvBenchConfig, benchmark_env
from vit.bench import SupernetBenchConfig, benchmark_supernet
from vit.evaluation import GridConfig, eval_supernet, evaluate_grid, grid_rows

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, timeout: int = 300) -> str:
    """The stdout of `scripts/<script>` run as a user would."""
    return run_script(script, *args, timeout=timeout).stdout


@pytest.fixture(scope="module")
def fmnist_weights(tmp_path_factory) -> Path:
    """Random weights of the prance_fmnist preset, standing in for a trained checkpoint."""
    torch.manual_seed(0)
    return vit.save_checkpoint(vit.create_supernet("prance_fmnist"), tmp_path_factory.mktemp("w") / "w.safetensors")


SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py"))
COUNTS_OF_IMAGES = {"--images", "--calib-images"}  # the only spellings of a number of images


def options(help_text: str) -> dict[str, str]:
    """Each long option of an argparse `--help` and its help text, lines joined."""
    found, current = {}, None
    for line in help_text.split("options:", 1)[1].splitlines():
        match = re.match(r"\s{2}(--[\w-]+)", line)
        if match:
            current = match.group(1)
            found[current] = ""
        if current:
            found[current] += " " + line.strip()
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_speaks_the_shared_vocabulary(script):
    flags = options(run(script, "--help"))
    assert "--model" not in flags and "--data-path" not in flags and "--limit" not in flags
    assert {f for f in flags if f.endswith("-images")} <= COUNTS_OF_IMAGES
    for flag, text in flags.items():
        assert len(re.findall(r"default", text, re.I)) <= 1, f"{flag}: {text}"
    if "--out" in flags:
        assert "folder" in flags["--out"]
    assert "--threads" in flags and "torch CPU threads" in flags["--threads"]
    assert flags["--device"].split(None, 2)[2].startswith("auto | cpu | cuda | cuda:N")
    assert "(default: auto)" in flags["--device"]
    if "--workers" in flags:
        assert "default: min(4, CPU cores)" in flags["--workers"]
    if "--amp" in flags:
        assert "(default: False)" in flags["--amp"]
    if "--batch-size" in flags:
        assert "images per" in flags["--batch-size"]
    if "--supernet" in flags:
        assert "registered supernet name" in flags["--supernet"]


def test_train_selector_sets_ppo_settings():
    flags = options(run("train_selector.py", "--help"))
    assert {"--clip-range", "--vf-coef", "--max-grad-norm", "--target-kl", "--minibatch-size"} <= set(flags)
    assert "(default: 0.2)" in flags["--clip-range"] and "--batch-size" not in flags


def test_train_supernet(tmp_path, fmnist_dir):
    out = run(
        "train_supernet.py",
        "--data-dir",
        str(fmnist_dir),
        "--out",
        str(tmp_path),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--steps-per-epoch",
        "2",
        "--eval-batches",
        "1",
        "--device",
        "cpu",
    )
    assert "epoch 1: Top-1 largest" in out
    assert (tmp_path / "supernet.safetensors").is_file()


def test_eval_supernet(tmp_path, fmnist_dir, fmnist_weights):
    out = run(
        "eval_supernet.py",
        "--checkpoint",
        str(fmnist_weights),
        "--data-dir",
        str(fmnist_dir),
        "--batch-size",
        "16",
        "--images",
        "20",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    )
    rows = [line for line in out.splitlines() if line.startswith("| ") and "token mode" not in line]
    assert len(rows) >= 3 * 12
    assert {"prune", "merge (tome)", "prune_merge (tome)"} == {r.split("|")[1].strip() for r in rows}
    assert (tmp_path / "static_grid.md").read_text().strip() == out.strip()


def grid_args(fmnist_dir: Path, weights: Path) -> dict:
    """`GridConfig` arguments of a small grid: merge mode, 20 held-out images, on the CPU."""
    args = dict(checkpoint=str(weights), data_dir=str(fmnist_dir), modes=("merge",), images=20, batch_size=8)
    return args | dict(workers=0, device="cpu")


def test_eval_supernet_compares_the_merge_variants(fmnist_dir, fmnist_weights):
    rows = grid_rows(GridConfig(**grid_args(fmnist_dir, fmnist_weights), merge_variants=("tome", "official")))
    by_variant = {v: {r["block"]: r["macs"] for r in rows if r["mode"] == f"merge ({v})"} for v in ("tome", "official")}
    assert by_variant["tome"].keys() == by_variant["official"].keys() and len(by_variant["tome"]) >= 12
    # the official variant matches by hidden states (64 wide) rather than keys: merging subnets cost more MACs
    assert any(by_variant["official"][b] > by_variant["tome"][b] for b in by_variant["tome"])
    assert all(0 <= r["top1"] <= 1 and 0 < r["flops_ratio"] <= 1 for r in rows)


def test_eval_supernet_extracts_a_subnet_and_checks_it(tmp_path, fmnist_dir, fmnist_weights):
    """`--extract`: a timm model folder that timm loads, the same predictions as the supernet, both timed."""
    args = grid_args(fmnist_dir, fmnist_weights) | dict(out=str(tmp_path / "subnet"), rounds=2)
    report = eval_supernet(GridConfig(**args, extract="h4-m256-r0.8"))
    assert report["architecture"] == "TokenReducingViT" and report["subnet"] == "h4-m256-r0.8"
    assert report["top1_extracted"] == report["top1_supernet"] and report["max_logit_difference"] <= 1e-5
    assert report["images"] == 20 and report["extracted_images_per_s"] > 0 and report["supernet_images_per_s"] > 0
    model = vit.create_supernet("prance_fmnist", checkpoint=fmnist_weights)
    subnet = model.search_space.parse("h4-m256-r0.8")
    assert report["macs"] == vit.count_macs(model, subnet)
    assert json.loads((tmp_path / "subnet" / "extraction.json").read_text()) == json.loads(json.dumps(report))
    loaded = timm.create_model(f"local-dir:{tmp_path / 'subnet'}", pretrained=True).eval()
    x = images(model, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x, subnet), atol=1e-5, rtol=0)
    with pytest.raises(vit.InvalidSubnetError, match="heads=8 is not one of the choices"):
        eval_supernet(GridConfig(**args | dict(out=str(tmp_path / "bad")), extract="h8-m256-r1"))
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_eval_supernet_measures_a_class_stratified_subset(tmp_path, fmnist_dir, fmnist_weights, monkeypatch):
    seen = []

    def evaluate(model, batches, subnets, device, desc):
        seen.extend(y for _, y in batches())
        return [0.0] * len(subnets)

    monkeypatch.setattr(vit.evaluation, "evaluate", evaluate)
    evaluate_grid(GridConfig(**grid_args(fmnist_dir, fmnist_weights), out=str(tmp_path)))
    test = vit.load_dataset("fashion-mnist", split="test", root=fmnist_dir)
    stratified = vit.data.labels_of(vit.data.stratified_subset(test, 20))
    assert torch.cat(seen).tolist() == stratified.tolist() != vit.data.labels_of(test)[:20].tolist()


# the scripts whose only output is what they print: run once each as a user starts them; their numbers are checked
# on what the package functions return
PRINTING = {
    "benchmark_supernet.py": ["--batch-size", "8", "--repeats", "1"],
    "benchmark_env.py": ["--num-envs", "4", "--repeats", "1"],
    "reinforce_example.py": ["--episodes", "2", "--images", "8"],
}


@pytest.mark.parametrize("script", sorted(PRINTING))
def test_a_printing_script_runs_as_a_user_starts_it(script, fmnist_dir, fmnist_weights):
    data = ["--checkpoint", str(fmnist_weights), "--data-dir", str(fmnist_dir)]
    assert run(script, *PRINTING[script], *(data if script != "benchmark_supernet.py" else []), "--device", "cpu")


def finite_and_positive(*values: float) -> bool:
    """Whether every value is a finite number above 0."""
    return all(math.isfinite(v) and v > 0 for v in values)


def test_benchmark_supernet():
    result = benchmark_supernet(SupernetBenchConfig(batch_size=8, repeats=2, device="cpu"))
    assert 0 < result["flops_ratio"] < 1 and result["full_mmacs"] > 0
    assert finite_and_positive(result["full_images_per_s"], result["images_per_s"], result["speedup"])
    low, high = result["speedup_range"]
    assert low <= result["speedup"] <= high
    assert [row["distinct"] for row in result["per_sample"]] == [1, 4, 8]  # 1, 4, 16, 64 and 8, capped at the batch
    for row in result["per_sample"]:
        assert 0 < row["flops_ratio"] <= 1
        for layout in ("packed", "bucketed"):
            assert finite_and_positive(row[layout]["images_per_s"], row[layout]["efficiency"])


def test_benchmark_env(fmnist_dir, fmnist_weights):
    cfg = EnvBenchConfig(checkpoint=str(fmnist_weights), data_dir=str(fmnist_dir), num_envs=4, repeats=2, device="cpu")
    result = benchmark_env(cfg)
    assert finite_and_positive(result["forward_seconds"])
    for reward in ("terminal", "delta"):
        assert finite_and_positive(
            result["episode_seconds"][reward], result["steps_per_s"][reward], result["ratio_to_forward"][reward]
        )
    # 11 decisions an episode on 4 sub-envs
    assert result["steps_per_s"]["terminal"] == pytest.approx(44 / result["episode_seconds"]["terminal"])


@pytest.fixture(scope="module")
def selector(tmp_path_factory, fmnist_dir, fmnist_weights) -> Path:
    """A selector trained by `scripts/train_selector.py` for 88 steps: its folder."""
    out = tmp_path_factory.mktemp("selector")
    run(
        "train_selector.py",
        *TINY_PPO,
        "--checkpoint",
        str(fmnist_weights),
        "--data-dir",
        str(fmnist_dir),
        "--total-steps",
        "88",
        "--out",
        str(out),
    )
    return out


TINY_PPO = ("--num-envs", "8", "--n-steps", "11", "--minibatch-size", "44", "--images", "8", "--device", "cpu")


def test_train_selector(selector):
    assert (selector / "selector.zip").is_file() and (selector / "selector.json").is_file()
    assert (selector / "eval_history.json").is_file()


def test_evaluate(tmp_path, fmnist_dir, selector):
    out = run(
        "evaluate.py",
        "--selector",
        str(selector / "selector"),
        "--data-dir",
        str(fmnist_dir),
        "--budgets",
        "0.4",
        "0.8",
        "--images",
        "40",
        "--calib-images",
        "16",
        "--batch-size",
        "16",
        "--executions",
        "packed",
        "bucketed",
        "prototypes",
        "--prototypes",
        "1",
        "2",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    )
    rows = [line for line in out.splitlines() if line.startswith("| ") and "method" not in line]
    methods = [r.split("|")[1].strip() for r in rows]
    modes = ("packed", "bucketed", "prototypes K=1", "prototypes K=2")
    assert methods[0] == "full model" and methods[-1] == "random decisions"
    assert all(methods.count(f"PRANCE selector, {mode}") == 2 for mode in modes)
    assert methods.count("best static subnet at matched MACs") == methods.count("uniform merging at matched MACs") == 2
    assert methods.count("PPT-style heuristic at matched MACs") == 2
    assert methods.count("Prune-and-Merge schedule at matched MACs") == 2
    assert "40 images" in out
    assert (tmp_path / "results.md").read_text().strip() in out
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
    results = json.loads((tmp_path / "results.json").read_text())
    table = results["table"]
    assert table[0]["speedup"] == 1.0 and table[0]["speedup_range"] == [1.0, 1.0]  # the full model is the reference
    for budget in (0.4, 0.8):
        selector_rows = {r["mode"]: r for r in table if r.get("budget") == budget}
        assert list(selector_rows) == list(modes)
        packed, bucketed = selector_rows["packed"], selector_rows["bucketed"]
        assert packed["price"] == bucketed["price"] == selector_rows["prototypes K=2"]["price"]  # one calibration
        for key in ("top1", "top5", "flops_ratio", "tokens_kept", "params"):  # the same decisions, run otherwise
            assert packed[key] == pytest.approx(bucketed[key])
    for row in table:
        assert row["images_per_s"] > 0 and row["images_per_cpu_s"] > 0 and row["speedup"] > 0
    swept = results["heuristics"]  # each heuristic's whole sweep, the matched rows among them
    assert len(swept["PPT-style heuristic"]) == 9 and len(swept["Prune-and-Merge schedule"]) == 18
    for name, rows in swept.items():
        assert all(r["params"] == table[0]["params"] for r in rows)  # full widths
        assert len({r["flops_ratio"] for r in rows}) > 5
        assert all({**r, "method": name} in rows for r in table if r["method"].startswith(name))


def test_evaluate_with_the_official_protocol(tmp_path, fmnist_dir, selector, capsys):
    args = dict(selector=str(selector / "selector"), data_dir=str(fmnist_dir), budgets=(0.5,), images=80)
    args |= dict(calib_images=16, heuristics=False, device="cpu", out=str(tmp_path))
    table = evaluate_selector(EvaluateConfig(**args, protocol="official"))
    out = capsys.readouterr().out
    assert "batch 64" in out and "PRANCE selector, batch-mean" in out
    assert not any(r["method"].startswith("PPT-style") for r in table)
    (row,) = [r for r in table if r.get("budget") == 0.5]
    assert row["execution"] == "batch-mean" and row["top5"] >= row["top1"] and row["params"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["table"] == json.loads(json.dumps(table))
    with pytest.raises(ValueError, match="unknown protocol 'paper'"):
        evaluate_selector(EvaluateConfig(**args, protocol="paper"))


def test_benchmark(tmp_path, fmnist_dir, selector):
    out = run(
        "benchmark.py",
        "--selector",
        str(selector / "selector"),
        "--data-dir",
        str(fmnist_dir),
        "--batch-size",
        "16",
        "--calib-images",
        "16",
        "--prototypes",
        "1",
        "2",
        "--supernet",
        "prance_fmnist",
        "--supernet-batch-size",
        "4",
        "--rounds",
        "2",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    )
    assert "freed memory kept" in out and "deciding" in out
    assert (tmp_path / "benchmark.md").read_text().strip() in out
    rows = json.loads((tmp_path / "benchmark.json").read_text())["rows"]
    timed = [r for r in rows if r["run"] != "deciding"]
    runs = {}
    for r in timed:
        runs.setdefault((r["part"], r["precision"]), []).append(r["run"])
    modes = ["packed", "bucketed", "prototypes K=1", "prototypes K=2"]
    assert runs == {
        **{("selector", p): ["full", "static", *modes] for p in ("fp32", "bf16")},
        **{("supernet", p): ["full", "static", "packed"] for p in ("fp32", "bf16")},
    }
    by = {(r["part"], r["precision"], r["run"]): r for r in timed}
    for r in timed:
        assert r["images_per_s"] > 0 and r["speedup"] > 0 and r["cpu_speedup"] > 0
        low, high = r["speedup_range"]
        assert low <= r["speedup"] <= high
        if r["run"] == "full":  # each precision's full model is its own reference
            assert r["speedup"] == r["cpu_speedup"] == 1.0
    for precision in ("fp32", "bf16"):
        packed, bucketed = by["selector", precision, "packed"], by["selector", precision, "bucketed"]
        assert packed["flops_ratio"] == bucketed["flops_ratio"]  # the same decisions at the same price
        assert 0.45 <= by["supernet", precision, "packed"]["flops_ratio"] <= 0.55  # random subnets near the budget
    assert by["supernet", "fp32", "packed"]["flops_ratio"] == by["supernet", "bf16", "packed"]["flops_ratio"]
    (deciding,) = [r for r in rows if r["run"] == "deciding"]
    assert 0 < deciding["share"] < 1


def test_ablate_rtg(tmp_path, fmnist_dir, fmnist_weights):
    out = run(
        "ablate_rtg.py",
        "--checkpoint",
        str(fmnist_weights),
        "--data-dir",
        str(fmnist_dir),
        "--steps",
        "176",
        "--every",
        "88",
        "--num-envs",
        "8",
        "--n-steps",
        "11",
        "--minibatch-size",
        "44",
        "--images",
        "16",
        "--calib-images",
        "16",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    )
    table = [line for line in out.splitlines() if line.startswith("| ") and "steps" not in line]
    assert len(table) >= 2 and all(line.count("/") == 3 for line in table)
    assert (tmp_path / "ablation.png").stat().st_size > 10_000


def test_ablate_rtg_on_grouped_decisions_with_the_one_shot_baseline(tmp_path, fmnist_dir, fmnist_weights):
    args = dict(checkpoint=str(fmnist_weights), data_dir=str(fmnist_dir), decisions="grouped", one_shot=True)
    args |= dict(rewards=("delta", "terminal"), steps=48, every=48, num_envs=8, n_steps=6, minibatch_size=16)
    curves = ablate_rtg(AblationConfig(**args, images=16, calib_images=16, device="cpu", out=str(tmp_path)))
    table = (tmp_path / "ablation.md").read_text()
    assert "| steps | delta | terminal | one-shot |" in table and "grouped decisions" in table
    for label, decisions, steps in (("delta", "grouped", 3), ("terminal", "grouped", 3), ("one-shot", "one-shot", 1)):
        saved = json.loads((tmp_path / f"{label}_seed0" / "selector.json").read_text())
        assert saved["env"]["decisions"] == decisions, label
        assert agents.load_adaptive(tmp_path / f"{label}_seed0" / "selector").codec.num_steps == steps
        (point,) = curves[label]  # one checkpoint, at 48 steps
        assert point["steps"] == 48 and 0 <= point["top1_at_budget"] <= 1 and 0 < point["flops_ratio_at_price"] <= 1


def test_reinforce_example(fmnist_dir, fmnist_weights):
    script = runpy.run_path(str(ROOT / "scripts" / "reinforce_example.py"))  # its policy and loop, not run
    args = dict(checkpoint=str(fmnist_weights), data_dir=str(fmnist_dir), episodes=4, images=16, device="cpu")
    result = script["main"](script["Args"](**args))
    assert len(result["returns"]) == 4 and all(math.isfinite(r) for r in result["returns"])
    assert 0 <= result["top1"] <= result["top5"] <= 1 and 0 < result["flops_ratio"] <= 1
