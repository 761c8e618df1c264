"""DMTG on your own tensors: 6 tasks, two hidden families, a backbone of your own; one call groups them."""
import torch
from torch import nn

from taskgrouping import Task, TensorTaskDataset, group_tasks


def main(n: int = 3000, epochs: int = 15) -> None:
    torch.manual_seed(0)
    x = torch.randn(n, 32)
    u, v = torch.tanh(x[:, :8] @ torch.randn(8, 3)), torch.tanh(x[:, 8:16] @ torch.randn(8, 3))
    targets = {f"u{i}": u[:, i:i + 1] for i in range(3)} | {f"v{i}": (v[:, i] > 0).long() for i in range(3)}
    tasks = [Task(f"u{i}", "regression") for i in range(3)] + [Task(f"v{i}", "binary") for i in range(3)]
    data = TensorTaskDataset(x, targets)
    train, val, test = torch.utils.data.random_split(data, [0.6, 0.2, 0.2], torch.Generator().manual_seed(0))
    backbone = nn.Sequential(nn.Sequential(nn.Linear(32, 64), nn.ReLU()), nn.Sequential(nn.Linear(64, 16), nn.ReLU()))
    result = group_tasks("dmtg", train, val, test, tasks, K=2, backbone=backbone, shared_blocks=1,
                         training={"epochs": epochs, "lr": 3e-3, "progress": False})
    print("groups:", result.groups)  # the grouped model is result.model: model(x) -> {task: prediction}
    print("test loss per task:", {t: round(m["loss"], 4) for t, m in result.per_task.items()})


if __name__ == "__main__":
    main()
