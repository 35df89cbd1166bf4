"""One description of a split: the degrees of every parallel axis, resolved and checked once.

``parallel_dims(cfg, world_size)`` (``ParallelDims.from_config``) turns the ``parallel``
config group into named degrees whose product is the world size (torchtitan's
``ParallelDims`` is the model, and like it this module imports the config).
``preflight.validate`` calls it before any worker starts, so a bad combination fails in the
launcher with a message that says what would work; each rank calls it again (same code, same
answer) and then :meth:`ParallelDims.build_mesh`. A strategy is its degrees: whether FSDP
shards is ``parallel.fsdp.degree`` (0 = off), never the preset's name.

Axes, outermost first (the order of the device mesh; ranks of an inner axis are neighbours,
so the axis that talks most gets the fastest links):

- ``dp`` (``parallel.dp_degree``): data parallel over clips. The ranks form dp groups of
  ``clip_ranks`` = world / dp neighbouring ranks; each group makes its own clip (its own
  seed, workloads/inputs.py ``group_seed``) and every collective of the axes below runs
  inside the group. No traffic between groups, except FSDP's when it shards over all ranks
  (``parallel.fsdp.degree=-1``: the weights are sharded over dp x the rest, so
  ``parallel=fsdp_fixed parallel.dp_degree=-1`` holds 1/world of the DiT per rank while each
  rank makes its own clip). Outermost.
- ``cfg`` (1 or 2): classifier-free guidance parallel. With 2, one half of the ranks runs
  the conditional forward and the other half the unconditional one at the same time; one
  exchange per sampling step joins the two (parallel/cfg.py). Little traffic: outermost.
- ``fsdp``: ranks that run the same sequence work on the same inputs (replicas). With
  ``parallel.fsdp.degree=N`` it is an own axis of N ranks and FSDP shards over it; with
  ``parallel.fsdp.degree=-1`` (as upstream Wan) FSDP shards over all ranks, sharing them
  with the other axes, and this axis takes what cfg x ring x ulysses leave (pure FSDP: all
  ranks). It is 1 when FSDP is off.
- ``ring``: ring attention; keys/values travel around the ring (point-to-point, overlapped
  with compute).
- ``ulysses``: heads exchanged with all-to-all, the heaviest traffic: innermost.

``ring`` x ``ulysses`` together are the sequence-parallel ranks ("sp"): the token sequence
is split over them (USP). A degree of -1 means "the ranks the other axes leave"; at most
one of ``dp_degree`` / ``ulysses_degree`` / ``ring_degree`` may be -1. With
``parallel.fsdp.degree=-1`` the fsdp (replica) axis takes what the others leave after that,
so ``dp_degree=-1`` with FSDP over all ranks leaves it 1 (no replicas: every group its own clip).

This module imports no torch at import time (the launcher uses it); ``build_mesh`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wan_exp.config import ConfigError

AXES = ("dp", "cfg", "fsdp", "ring", "ulysses")
CLIP_AXES = AXES[1:]  # the axes inside one dp group: the ranks that make one clip together


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def usp_suggestion(sp_ranks: int, num_heads: int) -> str:
    """The ulysses x ring split of ``sp_ranks`` sequence-parallel ranks with the largest
    Ulysses degree the heads allow (Ulysses is faster where heads allow it)."""
    ulysses = max(d for d in _divisors(sp_ranks) if num_heads % d == 0)
    return f"parallel.ulysses_degree={ulysses} parallel.ring_degree={sp_ranks // ulysses}"


def fsdp_shards(degree: Any) -> bool:
    """FSDP is on: ``parallel.fsdp.degree`` is not 0 (the degree is the only switch)."""
    return int(degree or 0) != 0


def runs_one_rank(parallel: Any) -> bool:
    """Every degree is 1 and FSDP is off: the split is one rank holding the whole model
    (``parallel=single``), whatever launcher.nproc_per_node=auto would give."""
    return not fsdp_shards(parallel.fsdp.degree) and all(
        int(getattr(parallel, f"{axis}_degree")) == 1 for axis in ("dp", "cfg", "ring", "ulysses")
    )


def parallel_dims(cfg: Any, world_size: int) -> ParallelDims:
    """The job's split as one ParallelDims; ConfigError naming the settings when the degrees
    do not fit the world size or the heads."""
    return ParallelDims.from_config(cfg.parallel, world_size, cfg.model.num_heads)


@dataclass(frozen=True)
class ParallelDims:
    dp: int  # groups of ranks, each making its own clip
    cfg: int
    fsdp: int  # size of the fsdp (replica) mesh axis; 1 when FSDP is off
    ring: int
    ulysses: int
    fsdp_enabled: bool
    fsdp_over_all_ranks: bool  # FSDP shards over every rank (shares them with the other axes)
    world_size: int

    # ------------------------------------------------------------------ derived
    @property
    def sp(self) -> int:
        """Sequence-parallel ranks: the token sequence is split over ring x ulysses."""
        return self.ring * self.ulysses

    @property
    def clip_ranks(self) -> int:
        """Ranks that make one clip together (one dp group): cfg x fsdp x ring x ulysses."""
        return self.world_size // self.dp

    def dp_rank(self, rank: int) -> int:
        """The dp group of global ``rank`` (dp is the outermost mesh axis: groups are blocks of
        ``clip_ranks`` neighbouring ranks)."""
        return rank // self.clip_ranks

    def clip_rank(self, rank: int) -> int:
        """``rank``'s place inside its dp group (0 .. clip_ranks - 1)."""
        return rank % self.clip_ranks

    @property
    def fsdp_shard_ranks(self) -> int:
        """How many ranks share one copy of the parameters (1: FSDP off)."""
        if not self.fsdp_enabled:
            return 1
        return self.world_size if self.fsdp_over_all_ranks else self.fsdp

    @property
    def degrees(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in AXES}

    def describe(self) -> str:
        """e.g. 'cfg2 x ring2 x ulysses1 x fsdp(all 4)' for records and reports ('dp2 x ...'
        first where there are several dp groups)."""
        parts = [f"dp{self.dp}"] if self.dp > 1 else []
        parts += [f"{axis}{getattr(self, axis)}" for axis in ("cfg", "ring", "ulysses")]
        if self.fsdp_enabled:
            parts.append(f"fsdp(all {self.world_size})" if self.fsdp_over_all_ranks else f"fsdp{self.fsdp}")
        return " x ".join(parts)

    # ------------------------------------------------------------------ resolve + check
    @classmethod
    def from_config(cls, parallel: Any, world_size: int, num_heads: int) -> ParallelDims:
        """Resolve -1 degrees and check the split; raises ConfigError saying what would work."""
        cfg = int(parallel.cfg_degree)
        if cfg not in (1, 2):
            raise ConfigError(
                f"parallel.cfg_degree={cfg}: use 1 (off) or 2 (conditional and "
                "unconditional forwards on two rank groups)"
            )
        dp = int(parallel.dp_degree)
        if dp == 0 or dp < -1:
            raise ConfigError(
                f"parallel.dp_degree={dp}: use 1 (every rank on one clip), N >= 2 (N groups of ranks, "
                "each making its own clip) or -1 (as many groups as the ranks the other axes leave)"
            )
        fsdp_enabled = fsdp_shards(parallel.fsdp.degree)
        fsdp_degree = int(parallel.fsdp.degree)
        if fsdp_degree < -1:
            raise ConfigError(
                f"parallel.fsdp.degree={fsdp_degree}: use 0 (no FSDP), -1 (shard over all "
                "ranks, as upstream) or the size of an own fsdp mesh axis (>= 1)"
            )
        over_all = fsdp_enabled and fsdp_degree == -1
        fsdp_axis = fsdp_degree if fsdp_enabled and not over_all else 1
        ring, ulysses = int(parallel.ring_degree), int(parallel.ulysses_degree)
        for name, value in (("ring_degree", ring), ("ulysses_degree", ulysses)):
            if value == 0 or value < -1:
                raise ConfigError(f"parallel.{name}={value}: use -1 (the ranks the other axes leave) or >= 1")
        free = [name for name, value in (("dp", dp), ("ring", ring), ("ulysses", ulysses)) if value == -1]
        if len(free) > 1:
            raise ConfigError(
                " and ".join(f"parallel.{name}_degree=-1" for name in free)
                + ": at most one degree can take the ranks the others leave; set "
                + ("one of them" if len(free) == 2 else "all but one")
            )
        fixed = cfg * fsdp_axis * max(dp, 1) * max(ring, 1) * max(ulysses, 1)
        if free and world_size % fixed:
            if free == ["dp"]:
                raise ConfigError(
                    f"parallel.dp_degree=-1 takes the ranks the other axes leave, but cfg={cfg} x "
                    f"fsdp={fsdp_axis} x ring={ring} x ulysses={ulysses} = {fixed} does not divide "
                    f"{world_size} ranks; use degrees whose product divides {world_size}"
                )
            raise ConfigError(
                f"{cls._dp_part(dp)}cfg={cfg} x fsdp={fsdp_axis} x the fixed sequence degree leave no whole "
                f"number of ranks out of {world_size}; {cls._what_fits(world_size, num_heads, cfg, fsdp_axis, dp)}"
            )
        if free:
            rest = world_size // fixed
            dp, ring, ulysses = (rest if value == -1 else value for value in (dp, ring, ulysses))
        if over_all and world_size % (dp * cfg * ring * ulysses) == 0:
            # FSDP over all ranks: the ranks dp x cfg x ring x ulysses leave are replicas of the
            # sequence work (pure FSDP: all of them), and FSDP shards over every rank
            fsdp_axis = world_size // (dp * cfg * ring * ulysses)
        product = dp * cfg * fsdp_axis * ring * ulysses
        if product != world_size:
            raise ConfigError(
                f"degrees {cls._dp_part(dp)}cfg={cfg} x fsdp={fsdp_axis} x ring={ring} x ulysses={ulysses} = "
                f"{product} ranks, but the job has {world_size}; "
                f"{cls._what_fits(world_size, num_heads, cfg, fsdp_axis, dp)}"
            )
        if num_heads % ulysses:
            raise ConfigError(
                f"parallel.ulysses_degree={ulysses} does not divide the {num_heads} heads "
                f"(model.num_heads); {usp_suggestion(ring * ulysses, num_heads)} does"
            )
        return cls(dp, cfg, fsdp_axis, ring, ulysses, fsdp_enabled, over_all, world_size)

    @staticmethod
    def _dp_part(dp: int) -> str:
        """'dp=N x ' in a message about the degrees, where dp is not 1 (the messages of splits
        without dp groups stay as they were)."""
        return "" if dp == 1 else f"dp={dp} x "

    @staticmethod
    def _what_fits(world_size: int, num_heads: int, cfg: int, fsdp_axis: int, dp: int = 1) -> str:
        outer = dp * cfg * fsdp_axis
        sp_ranks, left = divmod(world_size, outer)
        named = f"dp x cfg x fsdp = {outer}" if dp != 1 else f"cfg x fsdp = {outer}"
        if left:
            return f"{named} does not divide {world_size} ranks; use degrees whose product is {world_size}"
        given = f"dp={dp}, cfg={cfg}" if dp != 1 else f"cfg={cfg}"
        return f"with {given} and fsdp={fsdp_axis} this works: {usp_suggestion(sp_ranks, num_heads)}"

    # ------------------------------------------------------------------ device mesh
    def build_mesh(self, device_type: str) -> ParallelMesh | None:
        """The device mesh over (dp, cfg, fsdp, ring, ulysses) and the groups each part of the
        split uses; None when nothing is split (no process group needed). Every group but FSDP's
        over all ranks lies inside this rank's dp group."""
        if self.world_size == 1 and not self.fsdp_enabled:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, tuple(getattr(self, a) for a in AXES), mesh_dim_names=AXES)
        sp_mesh = mesh["ring", "ulysses"]._flatten("sp")
        fsdp_mesh = None
        if self.fsdp_enabled:
            fsdp_mesh = mesh._flatten("all") if self.fsdp_over_all_ranks else mesh["fsdp"]
        return ParallelMesh(
            mesh=mesh,
            cfg=mesh["cfg"].get_group() if self.cfg > 1 else None,
            sp=sp_mesh.get_group() if self.sp > 1 else None,
            ring=mesh["ring"].get_group() if self.ring > 1 else None,
            ulysses=mesh["ulysses"].get_group() if self.ulysses > 1 else None,
            fsdp=fsdp_mesh,
            clip=mesh[CLIP_AXES]._flatten("clip").get_group() if self.dp > 1 and self.clip_ranks > 1 else None,
        )


@dataclass(frozen=True)
class ParallelMesh:
    """The mesh of a split and the process groups of its parts (None: degree 1)."""

    mesh: Any  # DeviceMesh over AXES
    cfg: Any  # ProcessGroup of this rank's cfg pair
    sp: Any  # ring x ulysses flattened: the sequence is split over it
    ring: Any
    ulysses: Any
    fsdp: Any  # DeviceMesh FSDP shards over (the flattened whole mesh, or the fsdp axis)
    # the ranks of this rank's dp group (cfg x fsdp x ring x ulysses flattened), for the clip's
    # own collectives outside the DiT (parallel/vae.py); None: the default group is the clip's
    # (one dp group), or the clip has one rank
    clip: Any
