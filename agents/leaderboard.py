"""The leaderboard: every agent and baseline we have, scored on every registered task by `agents.score`.

Entries, per MDP (`per-block`, `grouped`):

- baselines: the full model, random decisions, the best static subnet, uniform merging, PPT-style and
  Prune-and-Merge-style token reduction (each sweep's best setting within the budget on the calibration images);
- the shipped PPO selector (per-block: the MDP it was trained on);
- PPO, A2C, RecurrentPPO and MaskablePPO trained from scratch for the same `steps` env steps, one run per seed;
- the Result-to-Go question, on the grouped MDP: PPO trained with the `delta` (Result-to-Go, the PPO entry),
  `direct` and `terminal` rewards, and the one-shot baseline that takes every decision at once from the stem over
  the same choices;
- `agents`: saved selectors of the user's, each scored on the tasks of its MDP.

Training runs go to `OUT/agents/<label>-seed<seed>/`, each resumable from its checkpoints; finished runs are reused
with `resume`. `train_runs` trains a shard of them (`shard=(k, n)`: every n-th run from the k-th), so that n
processes share the work.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from prance_env.tasks import BUDGETS, DECISIONS, get_task
from vit.bench import setup_cpu
from vit.cli import device_field

from .evaluation import Method
from .plots import save_figure
from .report import heuristic_methods
from .score import Outcomes, Score, Scorer, paired_difference
from .selector import read_settings, resolve_selector
from .training import SelectorConfig, train_selector

ALGOS = ("ppo", "a2c", "recurrent_ppo", "maskable_ppo")
ALGO_NAMES = {"ppo": "PPO", "a2c": "A2C", "recurrent_ppo": "RecurrentPPO", "maskable_ppo": "MaskablePPO"}
REWARDS = ("delta", "direct", "terminal")
ONE_SHOT = "one-shot"


@dataclass(frozen=True)
class AgentRun:
    """One selector trained from scratch for the leaderboard: algorithm, reward, the MDP it is trained on
    (`per-block`, `grouped` or `one-shot`) and the tasks' MDP it is scored on (`tasks`), and its seed."""

    algo: str
    reward: str
    decisions: str
    seed: int

    @property
    def tasks(self) -> str:
        """The MDP of the tasks this run is scored on: one-shot selectors decide over the grouped MDP's choices."""
        return "grouped" if self.decisions == ONE_SHOT else self.decisions

    @property
    def entry(self) -> str:
        """The leaderboard entry this run is a seed of."""
        if self.decisions == ONE_SHOT:
            return "one-shot PPO (no MDP)"
        reward = "" if self.reward == "delta" else f", {self.reward} reward"
        return f"{ALGO_NAMES[self.algo]} from scratch{reward}"

    @property
    def label(self) -> str:
        return f"{self.decisions}-{self.algo}-{self.reward}-seed{self.seed}"


def agent_runs(
    decisions: tuple[str, ...],
    algos: tuple[str, ...],
    rewards: tuple[str, ...],
    seeds: tuple[int, ...],
    one_shot: bool = True,
) -> list[AgentRun]:
    """Every run of the leaderboard, for every seed: each algorithm (delta reward) on each MDP and, on the grouped
    MDP, PPO with each other reward and the one-shot baseline (PPO, delta)."""
    for mdp in decisions:
        if mdp not in DECISIONS:
            raise ValueError(f"unknown decisions {mdp!r}; expected one of {', '.join(DECISIONS)}")
    kinds = [(algo, "delta", mdp) for mdp in decisions for algo in algos]
    if "grouped" in decisions:  # the Result-to-Go question, where the one-shot baseline decides over the same choices
        kinds += [("ppo", reward, "grouped") for reward in rewards if reward != "delta"]
        kinds += [("ppo", "delta", ONE_SHOT)] if one_shot else []
    runs = [AgentRun(*kind, seed) for kind in kinds for seed in seeds]
    return runs


@dataclass
class TrainSettings:
    """What every leaderboard run shares."""

    steps: int = 100_000
    supernet: str = "prance_fmnist"
    checkpoint: str | None = None
    data_dir: str | None = None
    device: str = "auto"
    threads: int = 1
    extra: dict = field(default_factory=dict)


def run_config(run: AgentRun, settings: TrainSettings, out: Path, resume: bool = True) -> SelectorConfig:
    """The `SelectorConfig` of `run`: the defaults of `train_selector.py` but for the algorithm, reward, MDP, seed
    and steps, no evaluation during training (the leaderboard scores the result), checkpoints every 50k steps."""
    return SelectorConfig(
        supernet=settings.supernet,
        checkpoint=settings.checkpoint,
        data_dir=settings.data_dir,
        algo=run.algo,
        reward=run.reward,
        decisions=run.decisions,
        total_steps=settings.steps,
        eval_every=100 * settings.steps,
        save_every=50_000,
        images=256,
        calib_images=0,  # the leaderboard calibrates on its tasks' images
        out=str(out / "agents" / run.label),
        resume=resume,
        seed=run.seed,
        device=settings.device,
        threads=settings.threads,
        **settings.extra,
    )


def finished(cfg: SelectorConfig) -> bool:
    """Whether a run's selector is saved."""
    return (Path(cfg.out) / "selector.zip").is_file() and (Path(cfg.out) / "selector.json").is_file()


def train_runs(runs: list[AgentRun], settings: TrainSettings, out: Path, shard: tuple[int, int] = (0, 1)) -> None:
    """Train the runs of shard `shard` = (k, n) (every n-th run from the k-th) that are not finished, each resumed
    from its newest checkpoint."""
    k, n = shard
    if not 0 <= k < n:
        raise ValueError(f"shard must be k/n with 0 <= k < n, got {k}/{n}")
    mine = [run for i, run in enumerate(runs) if i % n == k]
    todo = [run for run in mine if not finished(run_config(run, settings, out))]
    for run in tqdm(todo, desc=f"training (shard {k}/{n})"):
        tqdm.write(f"training {run.label} for {settings.steps} steps")
        train_selector(run_config(run, settings, out))


# --- scoring ------------------------------------------------------------------------------------------------------


@dataclass
class LeaderboardConfig:
    """Score every agent and baseline on every registered task, training the agents first (resumably)."""

    out: str = field(default="runs/leaderboard", metadata={"help": "output folder (results.md, .json, .png, agents/)"})
    decisions: tuple[str, ...] = field(default=DECISIONS, metadata={"help": "the tasks' MDPs"})
    budgets: tuple[float, ...] = field(default=BUDGETS, metadata={"help": "the tasks' budgets (MACs ratios)"})
    algos: tuple[str, ...] = field(default=ALGOS, metadata={"help": "algorithms trained from scratch"})
    rewards: tuple[str, ...] = field(default=REWARDS, metadata={"help": "rewards compared (grouped MDP, PPO)"})
    one_shot: bool = field(default=True, metadata={"help": "the one-shot baseline (grouped MDP)"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "training seeds of every agent"})
    steps: int = field(default=100_000, metadata={"help": "env steps of every agent trained from scratch"})
    agent: tuple[str, ...] = field(default=(), metadata={"help": "saved selectors of yours to add (PATH ...)"})
    shipped: bool = field(default=True, metadata={"help": "the shipped PPO selector (per-block)"})
    heuristics: bool = field(default=True, metadata={"help": "the PPT- and Prune-and-Merge-style baselines"})
    images: int | None = field(
        default=None, metadata={"help": "held-out images (default: the whole split; fewer for a quick look)"}
    )
    data_dir: str | None = field(default=None, metadata={"help": "Fashion-MNIST folder (default: Debian's)"})
    batch_size: int = field(default=256, metadata={"help": "images per forward"})
    train_only: bool = field(default=False, metadata={"help": "train the agents (of --shard) and stop"})
    shard: str = field(default="0/1", metadata={"help": "k/n: train every n-th run from the k-th (n processes)"})
    validate: str | None = field(default=None, metadata={"help": "re-run the entries of this results.json"})
    only: tuple[str, ...] = field(default=(), metadata={"help": "--validate: only the entries naming one of these"})
    device: str = device_field()
    threads: int = field(default=1, metadata={"help": "torch CPU threads per process (0: torch's default)"})


@dataclass(frozen=True)
class Entry:
    """A leaderboard entry: a baseline sweep (`sweep`), random decisions (`random`) or saved selectors, one per
    training seed (`policy`), scored on the tasks of MDP `decisions`."""

    name: str
    kind: str
    decisions: str
    paths: tuple[str, ...] = ()


SWEEPS = ("full model", "best static subnet", "uniform merging", "PPT-style", "Prune-and-Merge-style")
STATIC_SWEEPS, STATIC = SWEEPS[:3], "static subnet"


def task_names(decisions: str, budgets: tuple[float, ...]) -> list[str]:
    """The registered tasks of an MDP at these budgets."""
    return [f"fmnist-{decisions}-{budget:g}" for budget in budgets]


def shard_of(text: str) -> tuple[int, int]:
    k, _, n = text.partition("/")
    try:
        return int(k), int(n)
    except ValueError:
        raise ValueError(f"--shard is k/n (e.g. 0/2), got {text!r}") from None


def the_runs(cfg: LeaderboardConfig) -> list[AgentRun]:
    return agent_runs(cfg.decisions, cfg.algos, cfg.rewards, cfg.seeds, cfg.one_shot)


def train_settings(cfg: LeaderboardConfig) -> TrainSettings:
    return TrainSettings(steps=cfg.steps, data_dir=cfg.data_dir, device=cfg.device, threads=cfg.threads)


def entries(cfg: LeaderboardConfig) -> list[Entry]:
    """Every entry of `cfg`, per MDP: the baselines, the shipped selector, the agents trained from scratch (their
    seeds together) and the user's."""
    out, found = Path(cfg.out), []
    by_entry: dict[tuple[str, str], list[str]] = {}
    for run in the_runs(cfg):
        path = Path(run_config(run, train_settings(cfg), out).out) / "selector"
        by_entry.setdefault((run.entry, run.tasks), []).append(str(path))
    for mdp in cfg.decisions:
        sweeps = [s for s in SWEEPS if cfg.heuristics or "style" not in s]
        found += [Entry(name, "sweep", mdp) for name in sweeps[:2]] + [Entry("random decisions", "random", mdp)]
        found += [Entry(name, "sweep", mdp) for name in sweeps[2:]]
        if cfg.shipped and mdp == "per-block":
            found.append(
                Entry(
                    "PPO selector (shipped, 800k steps + joint fine-tuning)", "policy", mdp, ("shipped:prance_fmnist",)
                )
            )
        found += [Entry(name, "policy", mdp, tuple(paths)) for (name, tasks), paths in by_entry.items() if tasks == mdp]
    for path in cfg.agent:
        settings = read_settings(resolve_selector(path), required=("env",))
        mdp = settings["env"].get("decisions", "per-block")
        found.append(Entry(f"{Path(path).name} (yours)", "policy", "grouped" if mdp == ONE_SHOT else mdp, (path,)))
    return [e for e in found if e.decisions in cfg.decisions]


def sweep_methods(scorer: Scorer, name: str) -> dict[str, Method]:
    """The settings of the baseline sweep `name` (`SWEEPS`) on the scorer's supernet."""
    statics = dict(zip(scorer.static_names, scorer.static_methods.values()))
    if name == "full model":
        full = scorer.static_names[0]
        return {full: statics[full]}
    if name == "best static subnet":
        return statics
    if name == "uniform merging":
        widest = scorer.model.search_space.largest().blocks[-1]
        return {
            label: statics[label]
            for label, s in zip(scorer.static_names[1:], scorer.static_subnets[1:])
            if all(c.heads == widest.heads and c.mlp_hidden == widest.mlp_hidden for c in s)
        }
    heuristic = "PPT-style heuristic" if name == "PPT-style" else "Prune-and-Merge schedule"
    if not hasattr(scorer, "_heuristics"):
        scorer._heuristics = heuristic_methods(scorer.model, scorer.calibration)
    return {str(method): method for label, method in scorer._heuristics.values() if label == heuristic}


def entry_outcomes(scorer: Scorer, entry: Entry, budgets: tuple[float, ...]) -> dict[float, list[Outcomes]]:
    """An entry's held-out outcomes at each budget, one per training seed."""
    if entry.kind == "random":
        return {budget: [scorer.random] for budget in budgets}
    if entry.kind == "sweep":
        methods = sweep_methods(scorer, entry.name)
        family = STATIC if entry.name in STATIC_SWEEPS else entry.name  # subsets of the static grid
        return {budget: [scorer.sweep_outcomes(family, methods, budget)] for budget in budgets}
    runs: dict[float, list[Outcomes]] = {budget: [] for budget in budgets}
    for path in tqdm(entry.paths, desc=entry.name, leave=False):
        for budget, outcome in scorer.policy_outcomes(path, budgets).items():
            runs[budget].append(outcome)
    return runs


def score_entries(cfg: LeaderboardConfig, chosen: list[Entry], cache: Path | None = None) -> dict:
    """Every entry of `chosen` scored on its MDP's tasks: `scores` (one `Score` dict per entry and task) and `auc`
    (per entry, the area under its Top-1-MACs curve over the budgets, None where a budget is out of reach), and the
    Result-to-Go comparison (`rtg`: delta minus each other reward and one-shot, per budget). With `cache`, a
    folder, each MDP's results are written there (`<mdp>.json`) and reused while the entries and settings that
    made them are the same: scoring resumes MDP by MDP."""
    results: dict[str, list] = {"scores": [], "auc": [], "rtg": []}
    for mdp in dict.fromkeys(e.decisions for e in chosen):
        mine = [e for e in chosen if e.decisions == mdp]
        key = {"entries": [asdict(e) for e in mine], "budgets": list(cfg.budgets), "data_dir": cfg.data_dir,
               "held_out_images": cfg.images}  # fmt: skip
        path = None if cache is None else cache / f"{mdp}.json"
        if path is not None and path.is_file() and json.loads(path.read_text())["key"] == json.loads(json.dumps(key)):
            part = json.loads(path.read_text())["results"]
            tqdm.write(f"reusing the scores of the {mdp} entries in {path}")
        else:
            part = score_mdp(cfg, mdp, mine)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"key": key, "results": part}, indent=2))
        for name in results:
            results[name] += part[name]
    return results


def score_mdp(cfg: LeaderboardConfig, mdp: str, chosen: list[Entry]) -> dict:
    """`score_entries` for the entries of one MDP."""
    scores, aucs, rtg = [], [], []
    task = get_task(task_names(mdp, cfg.budgets[:1])[0])
    task = type(task)(**(asdict(task) | {"data_dir": cfg.data_dir}))
    scorer = Scorer(task, cfg.device, cfg.batch_size, cfg.images)
    outcomes_of = {}
    for entry in tqdm(chosen, desc=f"scoring the {mdp} entries"):
        runs = entry_outcomes(scorer, entry, cfg.budgets)
        outcomes_of[entry.name] = runs
        for budget, name in zip(cfg.budgets, task_names(mdp, cfg.budgets)):
            score = scorer.score(entry.name, runs[budget], budget)
            scores.append(Score(**(asdict(score) | {"task": name})).to_dict() | {"decisions": mdp})
        auc = scorer.auc(runs) if len(cfg.budgets) > 1 else None
        aucs.append({"entry": entry.name, "decisions": mdp, "auc": None if auc is None else asdict(auc)})
    delta = outcomes_of.get(AgentRun("ppo", "delta", mdp, 0).entry)
    others = [AgentRun("ppo", r, mdp, 0).entry for r in REWARDS[1:]] + [AgentRun("ppo", "delta", ONE_SHOT, 0).entry]
    for other in others:
        if delta is None or other not in outcomes_of:
            continue
        for budget in cfg.budgets:
            a = np.stack([o.correct for o in outcomes_of[other][budget]])
            b = np.stack([o.correct for o in delta[budget]])
            if a.shape != b.shape:
                continue
            diff = paired_difference(a, b, scorer.resamples, scorer.level, scorer.random_seed)
            rtg.append({"decisions": mdp, "budget": budget, "versus": other, "delta_minus": asdict(diff)})
    return {"scores": scores, "auc": aucs, "rtg": rtg}


def machine() -> dict:
    """What the scores were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads()}


def leaderboard(cfg: LeaderboardConfig) -> dict:
    """Train what is missing (or, with `train_only`, the runs of `shard`, then stop), score every entry, and write
    `OUT/results.json`, `OUT/results.md` (also printed) and `OUT/results.png`. Returns the results."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    setup_cpu(cfg.threads, keep_memory=False)
    started = time.time()
    train_runs(the_runs(cfg), train_settings(cfg), out, shard_of(cfg.shard) if cfg.train_only else (0, 1))
    if cfg.train_only:
        return {}
    chosen = entries(cfg)
    results = {"config": asdict(cfg), "machine": machine(), "entries": [asdict(e) for e in chosen]}
    results |= score_entries(cfg, chosen, cache=out / "scores")
    results["scoring_s"] = time.time() - started
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = markdown(results)
    (out / "results.md").write_text(text + "\n")
    save_figure(figure(results), out / "results.png")
    print(text)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'} and {out / 'results.png'}")
    return results


def validate(cfg: LeaderboardConfig) -> list[dict]:
    """Re-run the entries of the results file `cfg.validate` (those naming one of `cfg.only`, all by default, of the
    MDPs of `cfg.decisions`) on the settings it records, and check every score: `inside` when the Top-1 and MACs
    ratio it claims lie inside the re-run's intervals. Prints the table; returns its rows."""
    recorded = json.loads(Path(cfg.validate).read_text())
    settings = LeaderboardConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded["config"].items()})
    settings.device, settings.threads = cfg.device, cfg.threads
    setup_cpu(settings.threads, keep_memory=False)
    chosen = [Entry(**(e | {"paths": tuple(e["paths"])})) for e in recorded["entries"]]
    chosen = [e for e in chosen if not cfg.only or any(o in e.name for o in cfg.only)]
    chosen = [e for e in chosen if e.decisions in cfg.decisions]
    if not chosen:
        raise ValueError(f"no entry of {cfg.validate} names one of {', '.join(cfg.only)}")
    rerun = {(s["entry"], s["task"]): Score.from_dict(_plain(s)) for s in score_entries(settings, chosen)["scores"]}
    rows = []
    for claimed in recorded["scores"]:
        key = (claimed["entry"], claimed["task"])
        if key not in rerun:
            continue
        now, then = rerun[key], Score.from_dict(_plain(claimed))
        inside = now.top1.contains(then.top1.mean) and now.macs_ratio.contains(then.macs_ratio.mean)
        rows.append(
            {"entry": key[0], "task": key[1], "claimed": then.top1.mean, "rerun": asdict(now.top1), "inside": inside}
        )
    lines = ["| entry | task | claimed Top-1 (%) | re-run Top-1 (%) [95% CI] | |", "|---|---|---|---|---|"]
    for r in rows:
        ci = r["rerun"]
        lines.append(
            f"| {r['entry']} | {r['task']} | {r['claimed'] * 100:.2f} | {ci['mean'] * 100:.2f} "
            f"[{ci['low'] * 100:.2f}, {ci['high'] * 100:.2f}] | {'inside' if r['inside'] else 'OUTSIDE'} |"
        )
    outside = sum(not r["inside"] for r in rows)
    lines.append(f"\n{len(rows) - outside} of {len(rows)} scores inside their re-run's interval")
    print("\n".join(lines))
    return rows


def _plain(score: dict) -> dict:
    return {k: v for k, v in score.items() if k != "decisions"}


# --- tables and plot ----------------------------------------------------------------------------------------------


def _ci(interval: dict | None, scale: float = 100, digits: int = 2, sign: bool = False) -> str:
    if interval is None:
        return "n/a"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    low, high = (f.format(interval[key] * scale) for key in ("low", "high"))
    return f"{f.format(interval['mean'] * scale)} [{low}, {high}]"


def markdown(results: dict) -> str:
    """The leaderboard's tables: one per task, the area under the curve per entry, and the Result-to-Go question."""
    cfg = results["config"]
    count = cfg["images"]
    images = "the whole held-out split" if count is None else f"{count} held-out images"
    lines = [
        f"Scored on {images}; prices and best settings found on the tasks' calibration images (train split); "
        f"agents trained from scratch for {cfg['steps']} env steps, seeds {', '.join(map(str, cfg['seeds']))} "
        f"(intervals resample the seeds and the images); 95% bootstrap intervals; {results['machine']['cpu']}.",
        "Status: `met` within 0.02 of the budget, `under` spending less, `out of reach` spending more (not a score "
        "within the budget).",
    ]
    for task in dict.fromkeys(s["task"] for s in results["scores"]):
        rows = [s for s in results["scores"] if s["task"] == task]
        lines += [
            "",
            f"### {task}",
            "",
            "| entry | Top-1 (%) | MACs ratio | status | vs random (points) "
            "| vs best static at >= MACs (points) | static | setting |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in rows:
            settings = s["settings"][0] if len(set(s["settings"])) == 1 else ", ".join(s["settings"])
            lines.append(
                f"| {s['entry']} | {_ci(s['top1'])} | {_ci(s['macs_ratio'], 1, 3)} | {s['status']} "
                f"| {_ci(s['vs_random'], sign=True)} | {_ci(s['vs_static'], sign=True)} | {s['static']} "
                f"| {settings} |"
            )
    mdps = list(dict.fromkeys(a["decisions"] for a in results["auc"]))
    lines += [
        "",
        "### Area under the Top-1-MACs curve",
        "",
        f"Mean Top-1 (%) over budgets {', '.join(map(str, cfg['budgets']))} (trapezoid); n/a: a budget out of reach.",
        "",
        "| entry | " + " | ".join(mdps) + " |",
        "|---|" + "---|" * len(mdps),
    ]
    for name in dict.fromkeys(a["entry"] for a in results["auc"]):
        cells = [
            next((_ci(a["auc"]) for a in results["auc"] if a["entry"] == name and a["decisions"] == m), "")
            for m in mdps
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if results["rtg"]:
        lines += [
            "",
            "### Result-to-Go (delta) against the other rewards and one-shot, grouped MDP",
            "",
            "Paired difference in Top-1 (points): delta minus the other, at each budget.",
            "",
            "| versus | " + " | ".join(f"budget {b:g}" for b in cfg["budgets"]) + " |",
            "|---|" + "---|" * len(cfg["budgets"]),
        ]
        for other in dict.fromkeys(r["versus"] for r in results["rtg"]):
            cells = [
                next(
                    (
                        _ci(r["delta_minus"], sign=True)
                        for r in results["rtg"]
                        if r["versus"] == other and r["budget"] == b
                    ),
                    "",
                )
                for b in cfg["budgets"]
            ]
            lines.append(f"| {other} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(results: dict):
    """Top-1 against MACs ratio with their intervals, one panel per MDP; hollow markers: out of reach."""
    from matplotlib.figure import Figure

    mdps = list(dict.fromkeys(s["decisions"] for s in results["scores"]))
    fig = Figure(figsize=(7 * len(mdps), 5.5))
    axes = np.atleast_1d(fig.subplots(1, len(mdps)))
    for ax, mdp in zip(axes, mdps):
        rows = [s for s in results["scores"] if s["decisions"] == mdp]
        for i, name in enumerate(dict.fromkeys(s["entry"] for s in rows)):
            mine = [s for s in rows if s["entry"] == name]
            x = np.array([s["macs_ratio"]["mean"] for s in mine])
            y = np.array([s["top1"]["mean"] * 100 for s in mine])
            xerr = np.array(
                [
                    [
                        s["macs_ratio"]["mean"] - s["macs_ratio"]["low"],
                        s["macs_ratio"]["high"] - s["macs_ratio"]["mean"],
                    ]
                    for s in mine
                ]
            ).T
            yerr = (
                np.array(
                    [[s["top1"]["mean"] - s["top1"]["low"], s["top1"]["high"] - s["top1"]["mean"]] for s in mine]
                ).T
                * 100
            )
            color = f"C{i % 10}"
            marker = "osD^v<>ph*"[i // 10 % 10]
            ax.errorbar(x, y, yerr=yerr, xerr=xerr, fmt="none", ecolor=color, alpha=0.6, capsize=2)
            met = np.array([s["status"] != "out of reach" for s in mine])
            ax.plot(x[met], y[met], marker, color=color, label=name, linestyle="none")
            ax.plot(x[~met], y[~met], marker, color=color, mfc="none", linestyle="none")
        for budget in results["config"]["budgets"]:
            ax.axvline(budget, color="0.7", lw=0.8, ls=":")
        ax.set(title=f"{mdp} decisions", xlabel="MACs ratio (of the full model)", ylabel="Top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle("PranceViT leaderboard: held-out Top-1 against MACs, 95% intervals (hollow: over the budget)")
    fig.tight_layout()
    return fig


__all__ = [
    "ALGOS",
    "AgentRun",
    "Entry",
    "LeaderboardConfig",
    "TrainSettings",
    "agent_runs",
    "entries",
    "figure",
    "leaderboard",
    "markdown",
    "run_config",
    "score_entries",
    "train_runs",
    "validate",
]
