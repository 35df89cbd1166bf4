"""Degrees -> device meshes with named axes: "sp" (Ulysses) and "fsdp" (sharding).

The config gives two degrees (``config.resolve_degrees``); config.validate has already
checked that they fit the world size. The layouts that follow from them:

- a 2-D split (sp x fsdp = world, e.g. sp=4 x fsdp=2): one mesh of shape (fsdp, sp), so
  the ranks of one Ulysses group are neighbours (same node) and FSDP shards across groups;
- otherwise each axis is its own mesh: over all ranks when its degree is the world size
  (hybrid as upstream Wan has sp = fsdp = world: two meshes over the same ranks, since one
  DeviceMesh cannot name a dimension twice), or over groups of consecutive ranks when it
  is smaller (the groups then hold replicas of each other).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from wan_exp.config import resolve_degrees


@dataclass(frozen=True)
class ParallelMesh:
    sp: DeviceMesh | None  # Ulysses axis; None when the degree is 1
    fsdp: DeviceMesh | None  # FSDP axis; None when FSDP is off
    mesh: DeviceMesh | None  # the 2-D mesh of a split, else the FSDP or the Ulysses mesh


def _axis_mesh(name: str, degree: int, world_size: int, device_type: str) -> DeviceMesh:
    """A 1-D mesh named ``name`` over groups of ``degree`` consecutive ranks."""
    if degree == world_size:
        return init_device_mesh(device_type, (degree,), mesh_dim_names=(name,))
    replicas = world_size // degree
    return init_device_mesh(device_type, (replicas, degree), mesh_dim_names=(f"{name}_replica", name))[name]


def build_mesh(parallel_cfg, world_size: int, device_type: str) -> ParallelMesh:
    """The meshes for ``parallel_cfg`` on ``world_size`` ranks of ``device_type``; none
    (and no process group needed) when neither Ulysses nor FSDP is on."""
    sp, fsdp = resolve_degrees(parallel_cfg, world_size)
    use_sp, use_fsdp = sp > 1, bool(parallel_cfg.fsdp.enabled)
    if not (use_sp or use_fsdp):
        return ParallelMesh(sp=None, fsdp=None, mesh=None)
    if use_sp and use_fsdp and sp * fsdp == world_size:
        mesh = init_device_mesh(device_type, (fsdp, sp), mesh_dim_names=("fsdp", "sp"))
        return ParallelMesh(sp=mesh["sp"], fsdp=mesh["fsdp"], mesh=mesh)
    sp_mesh = _axis_mesh("sp", sp, world_size, device_type) if use_sp else None
    fsdp_mesh = _axis_mesh("fsdp", fsdp, world_size, device_type) if use_fsdp else None
    return ParallelMesh(sp=sp_mesh, fsdp=fsdp_mesh, mesh=fsdp_mesh or sp_mesh)
