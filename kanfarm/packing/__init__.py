"""Grid packing: runs that share every tensor shape and the batch order train as one stacked model.

``plan_packs`` forms packs, ``train_pack`` trains one (each member keeps its own records,
status, checkpoints and random streams; see ``trainer``).
"""
from kanfarm.packing.planner import auto_pack_size, pack_key, plan_packs
from kanfarm.packing.trainer import Member, train_pack

__all__ = ["Member", "auto_pack_size", "pack_key", "plan_packs", "train_pack"]
