"""Small DMTG fixtures shared by the tests of this folder: planted data (4 tasks in 2 groups), a K-branch
DMTG model on it and a method context."""

import torch

from taskgrouping.data.builtin import planted
from taskgrouping.engine.trainer import TrainConfig
from taskgrouping.methods.base import MethodContext
from taskgrouping.methods.dmtg import DMTGModel
from taskgrouping.models.branched import build_branched_model


def small_data():
    return planted(n_tasks=4, group_sizes=[2, 2], input_dim=8, feature_dim=3, n_train=96, n_val=48, n_test=48)


def small_model(data, K=2, s=None, scaling="none"):
    torch.manual_seed(0)
    net = build_branched_model(data.tasks, [data.task_names] * K, data.input_shape, backbone="mlp",
                               backbone_options={"widths": [8, 4]})
    s = torch.zeros(len(data.tasks), K) if s is None else s
    return DMTGModel(net, data.task_names, s, scaling)


def method_ctx(data, K, options):
    return MethodContext(data=data, seed=0, K=K, train=TrainConfig(epochs=3, batch_size=32, progress=False),
                         model={"backbone": "mlp", "options": {"widths": [8, 4]}}, balancer={"name": "ew"},
                         options=options, name="dmtg")
