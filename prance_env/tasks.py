"""Named benchmark tasks over PranceViT: an MDP, a MACs budget and the images a policy is calibrated and scored on.

A task fixes everything a comparison between agents needs besides the agent: the env's arguments (supernet,
checkpoint, decisions), the budget as a fraction of the full model's MACs, the calibration images (a seeded
class-stratified subset of the training split, on which a policy's price is found) and the held-out images (the
whole held-out split, on which it is scored). The registered tasks are the shipped supernet with the per-block and
the grouped MDP at budgets 0.3, 0.5 and 0.7 (`list_tasks`); `Task.custom` names any registered supernet and dataset.

    task = prance_env.tasks.get_task("fmnist-per-block-0.5")
    env = task.make_env()                     # gymnasium.make("PranceViT-v1", **task.env_kwargs())
    calibration, held_out = task.datasets(env.unwrapped.model)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import gymnasium
from torch.utils.data import Dataset

import vit
from vit.data import held_out_split, stratified_subset
from vit.inference import DecisionSchedule

BUDGETS = (0.3, 0.5, 0.7)
DECISIONS = ("per-block", "grouped")


@dataclass(frozen=True)
class Task:
    """One benchmark task.

    Attributes:
        name: how the task is addressed (`get_task`).
        supernet: a registered preset; `checkpoint` its weights (None: the preset's shipped or reference ones).
        decisions: the MDP's decisions (`per-block` or `grouped`, as the env's `decisions`).
        budget: the mean fraction of the full model's MACs a policy is calibrated to.
        data, data_dir: the dataset (`vit.load_dataset`'s name and folder).
        calibration_images: the size of the seeded class-stratified subset of the training split a policy's price
            is calibrated on; `seed` draws it.
    """

    name: str
    supernet: str = "prance_fmnist"
    checkpoint: str | None = None
    decisions: str = "per-block"
    budget: float = 0.5
    data: str = "fashion-mnist"
    data_dir: str | os.PathLike | None = None
    calibration_images: int = 2048
    seed: int = 0
    env_overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.budget <= 1:
            raise ValueError(f"a task's budget is a fraction of the full model's MACs in (0, 1], got {self.budget}")
        if self.decisions not in DECISIONS:
            raise ValueError(f"unknown decisions {self.decisions!r}; expected one of {', '.join(DECISIONS)}")
        if self.calibration_images < 1:
            raise ValueError(f"calibration_images must be at least 1, got {self.calibration_images}")

    @classmethod
    def custom(cls, supernet: str, data: str, budget: float, decisions: str = "per-block", **kwargs) -> Task:
        """A task over any registered supernet and dataset, named after them."""
        return cls(f"{supernet}-{data}-{decisions}-{budget:g}", supernet, decisions=decisions, budget=budget, data=data,
                   **kwargs)  # fmt: skip

    def env_kwargs(self) -> dict:
        """The keyword arguments of `gymnasium.make("PranceViT-v1", ...)` for this task (training split)."""
        kwargs = dict(supernet=self.supernet, checkpoint=self.checkpoint, decisions=self.decisions, data=self.data)
        return kwargs | dict(data_dir=self.data_dir, split="train") | dict(self.env_overrides)

    def make_env(self, **kwargs) -> gymnasium.Env:
        """The task's env (`kwargs` add to or override the task's, e.g. `device`)."""
        return gymnasium.make("PranceViT-v1", **(self.env_kwargs() | kwargs))

    def schedule(self) -> DecisionSchedule:
        """Where the task's decisions fall and what each sets."""
        return DecisionSchedule.named(self.decisions)

    def build_supernet(self, device: str = "auto") -> vit.ElasticViT:
        """The task's supernet, as its env builds it: the preset with the task's weights, offering the ratios its
        decisions choose, in eval mode on `device`."""
        model = vit.create_supernet(
            self.supernet,
            pretrained=self.checkpoint is None,
            checkpoint=self.checkpoint,
            **self.schedule().supernet_kwargs(),
            **{k: v for k, v in self.env_overrides.items() if k == "token_mode"},
        )
        return model.to(vit.utils.resolve_device(device)).eval()

    def datasets(self, model: vit.ElasticViT) -> tuple[Dataset, Dataset]:
        """(calibration images, held-out images), read at `model`'s input size: the seeded class-stratified subset
        of the training split and the whole held-out split."""
        train = vit.load_dataset(self.data, split="train", root=self.data_dir, model=model)
        held_out = vit.load_dataset(self.data, split=held_out_split(self.data), root=self.data_dir, model=model)
        return stratified_subset(train, min(self.calibration_images, len(train)), self.seed), held_out


def _registered() -> dict[str, Task]:
    tasks = {}
    for decisions in DECISIONS:
        for budget in BUDGETS:
            name = f"fmnist-{decisions}-{budget:g}"
            tasks[name] = Task(name, decisions=decisions, budget=budget)
    return tasks


_TASKS = _registered()


def list_tasks() -> list[str]:
    """The registered tasks' names."""
    return list(_TASKS)


def get_task(name: str) -> Task:
    """The registered task `name`; a `ValueError` listing them for another name."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; registered: {', '.join(_TASKS)}")
    return _TASKS[name]


__all__ = ["BUDGETS", "DECISIONS", "Task", "get_task", "list_tasks"]
