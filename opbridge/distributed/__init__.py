"""Expert parallelism for opbridge MoE layers over ``torch.distributed`` (NCCL, HCCL, gloo).

``ExpertParallelMoE`` (an ``nn.Module``) and ``ep_moe`` (functional) shard the routed experts over a
process group and move tokens with ``all_to_all_single``; the experts of each rank run through
``opbridge.moe``. The stages are exposed too (``setup``, ``dispatch``, ``expert_compute``,
``combine``) for timing and for callers that interleave their own work. See docs/distributed.md.
"""
from .ep import Dispatched, EPStats, combine, dispatch, ep_moe, expert_compute, setup, stats
from .layout import ExpertShard, Layout, make_layout
from .module import ExpertParallelMoE
from .payload import Payload

__all__ = ["ExpertParallelMoE", "ep_moe", "setup", "dispatch", "expert_compute", "combine", "stats",
           "Dispatched", "EPStats", "ExpertShard", "Layout", "make_layout", "Payload"]
