"""Fully sharded data parallelism (torch FSDP2, ``fully_shard``) for models that do not fit one worker.

A sharded worker holds 1/N of every transformer block's weights, their gradients and their optimizer state; each
block is all-gathered for its forward and backward and its gradients are reduce-scattered (averaged) right after.
The VIB masks and the Lagrange multipliers live outside the model (:mod:`vtrans.vib` attaches them by hooks): they
stay replicated, and :func:`average_grads` averages their gradients over the workers after every backward - what
DDP does for them - so N sharded workers x B/N samples take the step one worker takes on B.

LoRA adapters (:mod:`vtrans.lora`) put on a model before it is sharded are sharded with their blocks; ones put on a
sharded model (between pruning rounds) stay whole on every worker, their gradients averaged as the masks' are. Either
way :meth:`vtrans.lora.LoraAdapters.merge` adds each worker's shard of the update to its shard of the weight.

Checkpoints keep the unsharded layout: :func:`gather` turns a sharded state (DTensors) into full tensors, and
:func:`local_like` cuts a full tensor back into this worker's shard, so a checkpoint written by N sharded workers
loads in one process or on M workers, sharded or not. Torch only (no Ray): any launcher that has started a
``torch.distributed`` process group can use it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["average_grads", "gather", "is_sharded", "local_like", "shard", "shard_units"]


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a shard of a distributed tensor (an FSDP2 parameter, its gradient or optimizer state)."""
    return dist.is_available() and isinstance(t, _dtensor())


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`shard` wraps one by one: every transformer block of ``model`` (its registered architecture's
    layer stack), in order. The model itself is wrapped last and holds what is left (embeddings, final norm, head)."""
    from vtrans.arch import for_model

    adapter = for_model(model)
    stack = model.get_submodule((adapter.prefix_of(model) + adapter.layers_path).strip("."))
    return list(stack)


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model`` in place over every process of the default process group (``fully_shard`` on each block, then
    on the root) and move the shards to ``device``. Attach the VIB before sharding (its hooks stay on the blocks) and
    build the optimizers after it: sharding replaces every parameter of the model by a sharded one."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in shard_units(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def average_grads(params: list[nn.Parameter]) -> None:
    """Average the gradients of replicated parameters (masks, lambdas) over the workers, in one all-reduce. Every
    worker must call it with the same parameters: ones without a gradient here count as zeros, as DDP counts them.
    Nothing to do in one process (no process group)."""
    if not params or not dist.is_available() or not dist.is_initialized():
        return
    world = dist.get_world_size()
    if world == 1:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])  # (n,)
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        if p.grad is not None:  # a parameter this phase does not use keeps no gradient, on every worker alike
            p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def gather(tensors: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """``tensors`` with every shard replaced by the full tensor, on the CPU, in key order. A collective: every worker
    calls it with the same keys (in any order: a state loaded from a checkpoint may list them in another order on each
    worker); with ``keep=False`` (every worker but the one that writes) each full tensor is dropped as soon as it is
    gathered, so only the writer ever holds the whole state."""
    out: dict[str, torch.Tensor] = {}
    for k in sorted(tensors):  # the same collectives in the same order on every worker
        v = tensors[k]
        if is_sharded(v):
            v = v.full_tensor()
        if keep:
            out[k] = v.detach().cpu()
    return out


def local_like(reference: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``reference``: this worker's shard of it when ``reference`` is sharded (cut locally, every
    worker holds ``full``), else ``full`` itself."""
    if not is_sharded(reference) or is_sharded(full) or full.shape != reference.shape:
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(reference.device, reference.dtype), reference.device_mesh, reference.placements,
                             src_data_rank=None)
