"""Standley's HOA (two-shot) on your own torch Dataset of (x, {task: target}): 2 tasks per half of an image."""
import torch
from torch import nn
from taskgrouping import Task, group_tasks


class Halves(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        top, bottom = self.x[i, 0, :4], self.x[i, 0, 4:]
        return self.x[i], {"top_sum": top.sum().view(1), "top_pos": (top[:, :4].sum() > 0).long(),
                           "bottom_sum": bottom.sum().view(1), "bottom_pos": (bottom[:, 4:].sum() > 0).long()}


def main(n: int = 800, epochs: int = 8) -> None:
    tasks = [Task(t, "regression" if t.endswith("sum") else "binary") for t in Halves(1, 0)[0][1]]
    backbone = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 32), nn.ReLU())
    result = group_tasks("hoa", Halves(n, 0), Halves(n // 4, 1), Halves(n // 4, 2), tasks, K=2, backbone=backbone,
                         training={"epochs": epochs, "batch_size": 64, "progress": False})
    print("groups:", result.groups, f"({result.record['n_networks']} networks trained, budget K=2 networks)")


if __name__ == "__main__":
    main()
