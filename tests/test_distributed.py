"""vitkern models under torch's own distributed engines: DistributedDataParallel and FSDP2 (``fully_shard``).

Two ranks on the gloo backend over loopback (torch.multiprocessing spawn, MASTER_ADDR=127.0.0.1, a free port) train
a small CoAtNet, LeViT and ConvMixer for a few SGD steps on the CPU path (``auto``), each rank on its half of every
batch; ConvMixer also trains for one step on the Triton kernels (under the interpreter on CPU) and under
``torch.compile`` inside DDP. The parameters after the steps must equal a single-process run on the whole batches,
and the full state dict rank 0 saves must load into a fresh single-process model.

BatchNorm layers run in eval mode (running statistics, as when fine-tuning): in training mode each rank would
normalise with its own half batch's statistics, which is not the single-process computation (SyncBatchNorm needs
CUDA). The ranks run in one spawn for every case, with a process-group timeout and a hard deadline on the spawn, so
the test can never hang.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import vitkern
from vitkern.models.coatnet import CoAtNet
from vitkern.models.convmixer import ConvMixer
from vitkern.models.levit import LeViT

WORLD_SIZE = 2
PER_RANK_BATCH = 2
STEPS = 3
LEARNING_RATE = 0.05
NUM_CLASSES = 5
# A collective that waits longer than this raises in the ranks; the spawn as a whole is killed after DEADLINE_S.
PROCESS_GROUP_TIMEOUT_S = 60
DEADLINE_S = 240
RTOL = ATOL = 1e-4

MODELS = {
    "coatnet": (
        lambda: CoAtNet(img_size=32, depth=(1, 1, 1, 1, 1), embed_dim=(8, 16, 32, 32, 32), num_classes=NUM_CLASSES),
        32,
    ),
    "levit": (
        lambda: LeViT(
            img_size=64,
            embed_dim=(16, 32),
            depth=(1, 1),
            num_heads=(2, 2),
            key_dim=8,
            num_classes=NUM_CLASSES,
            distilled=False,
        ),
        64,
    ),
    "convmixer": (
        lambda: ConvMixer(16, 2, kernel_size=5, patch_size=4, num_classes=NUM_CLASSES, img_size=16),
        16,
    ),
    # the Triton interpreter runs one program at a time: a ConvMixer of one block on 2x2 patches
    "convmixer_tiny": (
        lambda: ConvMixer(4, 1, kernel_size=3, patch_size=4, num_classes=NUM_CLASSES, img_size=8),
        8,
    ),
}
ENGINES = ("ddp", "fsdp2")
# (engine, model, backend, steps, compiled)
CASES = [
    *[(engine, name, "auto", STEPS, False) for engine in ENGINES for name in ("coatnet", "levit", "convmixer")],
    ("ddp", "convmixer_tiny", "triton", 1, False),
    ("ddp", "convmixer", "auto", STEPS, True),
]


def case_id(case) -> str:
    engine, name, backend, _, compiled = case
    return f"{engine}-{name}-{backend}" + ("-compiled" if compiled else "")


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name][0]()
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


def make_batches(name: str, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The whole batches of every step (WORLD_SIZE * PER_RANK_BATCH images), the same in every process."""
    size = MODELS[name][1]
    generator = torch.Generator().manual_seed(1)
    batch = WORLD_SIZE * PER_RANK_BATCH
    return [
        (
            torch.randn(batch, 3, size, size, generator=generator),
            torch.randint(0, NUM_CLASSES, (batch,), generator=generator),
        )
        for _ in range(steps)
    ]


def train(model: nn.Module, batches, backend: str) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    for images, labels in batches:
        optimizer.zero_grad()
        with vitkern.backend(backend):
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
        optimizer.step()


def _run_case(case, rank: int, out_dir: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    engine, name, backend, steps, compiled = case
    model = make_model(name)
    mine = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
    batches = [(images[mine], labels[mine]) for images, labels in make_batches(name, steps)]
    if engine == "ddp":
        wrapped = DistributedDataParallel(model)
        train(torch.compile(wrapped, backend="aot_eager") if compiled else wrapped, batches, backend)
        state = model.state_dict()
    else:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        for child in model.children():
            if any(True for _ in child.parameters()):
                fully_shard(child, mesh=mesh)
        fully_shard(model, mesh=mesh)
        train(model, batches, backend)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(state, os.path.join(out_dir, f"{case_id(case)}.pt"))


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=PROCESS_GROUP_TIMEOUT_S)
    )
    try:
        for case in CASES:
            _run_case(case, rank, out_dir)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Run every case on two ranks once; the directory of rank 0's checkpoints."""
    out_dir = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(
        _worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the two ranks did not finish within {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return out_dir


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_two_ranks_match_one_process_and_the_checkpoint_loads(checkpoints, case):
    engine, name, backend, steps, compiled = case
    saved = torch.load(checkpoints / f"{case_id(case)}.pt", weights_only=True)
    single = make_model(name)
    train(single, make_batches(name, steps), backend)
    expected = single.state_dict()
    assert saved.keys() == expected.keys()
    initial = make_model(name).state_dict()
    moved = [key for key in expected if not torch.equal(expected[key], initial[key])]
    assert moved, "no parameter changed: the comparison would prove nothing"
    for key, value in expected.items():
        torch.testing.assert_close(saved[key], value, rtol=RTOL, atol=ATOL, msg=lambda m, key=key: f"{key}: {m}")
    fresh = make_model(name)
    fresh.load_state_dict(saved, strict=True)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key]), f"{key} did not load"
