"""Your own tensors, backbone and heads with taskgrouping's trainer and grouping methods."""
import torch
from torch import nn

from taskgrouping import Task, TensorTaskDataset, TrainConfig, build_branched_model, evaluate, train
from taskgrouping.data.base import make_loader

torch.manual_seed(0)
x = torch.randn(600, 20)
targets = {"price": x[:, :3].sum(1, keepdim=True), "churn": (x[:, 0] > 0).long(), "age": x[:, 5:6] * 2}
tasks = [Task("price", "regression"), Task("churn", "binary"), Task("age", "regression")]
data = TensorTaskDataset(x, targets)
train_set, val_set, test_set = torch.utils.data.random_split(data, [400, 100, 100])
backbone = nn.Sequential(nn.Sequential(nn.Linear(20, 64), nn.ReLU()), nn.Sequential(nn.Linear(64, 32), nn.ReLU()))
# two groups: {price, churn} and {age}, sharing the first backbone block
model = build_branched_model(tasks, [["price", "churn"], ["age"]], (20,), backbone=backbone, shared_blocks=1)
result = train(model, make_loader(train_set, 64, True), make_loader(val_set, 64, False), tasks,
               TrainConfig(epochs=10, lr=3e-3, progress=False))
print(evaluate(result.model, make_loader(test_set, 64, False), tasks))
