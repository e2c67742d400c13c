"""FSDP (train.distributed: fsdp): parameters, gradients and optimizer state sharded across processes.

PyTorch's fully_shard (FSDP2) shards each block and then the rest of the model (embeddings, final
norm, the tied output matrix). Accelerate still starts the processes, places devices and runs
autocast; it applies FSDP on GPUs only, while fully_shard works on CPU (gloo) as well, so lmp calls
it directly and the same code runs everywhere. Checkpoints hold full tensors in exactly the layout
of a DDP run (a transformers folder, an index-keyed optimizer state), so a run resumes with any
number of processes, in either mode. Gathering full tensors is collective: every process calls
these functions at the same point.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from lm_pretrain.model.decoder import Decoder


def shard(model: Decoder) -> None:
    """Shard `model` in place: one FSDP unit per block, one for the rest."""
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (collective), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def plain_copy(model: Decoder, is_main: bool) -> Decoder | None:
    """An unsharded copy with the full weights, on the main process (None elsewhere): what is
    saved, exported and evaluated there."""
    weights = {name: full(t).detach().cpu() for name, t in model.state_dict().items()}
    if not is_main:
        return None
    copy = Decoder(model.config)
    copy.load_state_dict(weights)
    return copy


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with every sharded state tensor gathered whole (collective)."""
    state = optimizer.state_dict()
    return {
        "state": {i: {k: full(v).cpu() for k, v in s.items()} for i, s in state["state"].items()},
        "param_groups": state["param_groups"],
    }


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full (DDP-layout) optimizer state into an optimizer of sharded parameters: every
    process holds the whole state and keeps the shard of each tensor its parameter has."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {}
    for index, entries in state["state"].items():
        param = params[int(index)]
        sharded[index] = {
            k: distribute_tensor(v.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
            if isinstance(param, DTensor) and v.dim() > 0
            else v
            for k, v in entries.items()
        }
    optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})
