"""Data parallelism for a student: DDP (a full copy per process) or FSDP2 (parameters sharded).

Alone (one process) every function here is the identity or a plain call, so the training loop
reads the same with one process or many. Under gloo (the CPU) FSDP2 reduces with SUM and divides
afterwards: gloo's AVG is silently wrong (pytorch/pytorch#162338).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from pipeline.distributed import Process


def wrap(model: nn.Module, process: Process, device: torch.device, parallelism: str) -> nn.Module:
    """The module to train: `model` itself when alone, else wrapped (its parameters stay `model`'s)."""
    if not process.distributed:
        return model
    if parallelism == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(device.type, (process.world_size,))  # an explicit CPU mesh keeps gloo on the CPU
    for block in decoder_blocks(model):  # each block its own group, then the rest (embeddings, head) at the root
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if dist.get_backend() == "gloo":  # torch >= 2.8 reduce-scatters with AVG, which gloo lacks: a sum, then a
        for module in model.modules():  # division, as FSDP2 before 2.8 did on its own
            if isinstance(module, FSDPModule) and hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)
    return model


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, found the way transformers finds them to place or shard a model:
    the modules whose class its `_no_split_modules` names (LlamaDecoderLayer, GPT2Block, ...). Any
    family, an --init-from student included; none found: the whole model is one group."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


@contextlib.contextmanager
def gradient_sync(trained: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients over processes in this backward pass only when `enabled` (the last micro-batch
    of an accumulation): the others accumulate locally, with no all-reduce."""
    if isinstance(trained, nn.parallel.DistributedDataParallel) and not enabled:
        with trained.no_sync():
            yield
        return
    if hasattr(trained, "set_requires_gradient_sync"):  # FSDP2
        trained.set_requires_gradient_sync(enabled)
    yield


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, process: Process) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts on the CPU (gathered from every process: call on all;
    rank 0's copy is the one to save)."""
    if not process.distributed:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def full_model_state(model: nn.Module, process: Process) -> dict | None:
    """The unsharded model state on rank 0 (for save_pretrained of a sharded model; call on every process),
    without the second name of a tied weight (as save_pretrained itself writes it)."""
    if not process.distributed:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first_name: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if first_name.setdefault(id(parameter), name) != name:  # a tied weight's second name (lm_head = embeddings)
            state.pop(name, None)
    return state


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, process: Process, model_state: dict | None,
                    optimizer_state: dict | None) -> None:
    """Load unsharded state read by rank 0 (the other ranks pass None and receive it)."""
    if not process.distributed:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, model_state if process.is_main else {}, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state if process.is_main else {}, options=options)


def reduce_mean(process: Process, values: dict[str, torch.Tensor]) -> dict[str, float]:
    """The mean over processes of each 0-d tensor (one all-reduce for all), as floats."""
    stacked = torch.stack([value.detach().float() for value in values.values()])
    if process.distributed:
        stacked = stacked.to(_comm_device())
        dist.all_reduce(stacked)  # SUM, then divide (gloo's AVG is wrong)
        stacked = stacked / process.world_size
    return dict(zip(values, stacked.tolist()))


def reduce_sum(process: Process, value):
    """The sum over processes of a float (-> float) or a tensor (-> a tensor on the value's device)."""
    if not process.distributed:
        return value
    if isinstance(value, torch.Tensor):
        total = value.detach().to(_comm_device(), torch.float64)
        dist.all_reduce(total)
        return total.to(value.device, value.dtype)
    total = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(total)
    return float(total.item())


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def unwrap(trained: nn.Module) -> Any:
    return trained.module if isinstance(trained, nn.parallel.DistributedDataParallel) else trained
