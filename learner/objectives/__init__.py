"""The learner's objectives, one module each, behind one small interface (``learner.objective`` in the topology).

An objective turns one group (its stored tensors, its advantages) into gradients through the learner's model:

    group_loss(up, group, adv, n_units, prox, ref, fresh) -> {stat: value}

``up`` is the :class:`~editrl.learner.update.Updater` (its ``cfg``, ``policy``, ``model``, ``engine``): the objective
runs the family's forward(s), calls ``up.engine.backward(loss * weight)`` once per chunk so every unit of the step
weighs the same (``n_units`` in the batch), and returns its detached statistics (means over chunks; ``*_max`` keys
the max). ``prox`` is the proximal log-probs (a tensor, ``"forward"`` = the θ forward's detached value, or
``"behave"`` = bypassed), ``ref`` the reference policy's log-probs (KL) or None, ``fresh`` whether the group was
sampled by the weights the learner holds.

- ``flow_grpo`` (:mod:`.flow_grpo`, default, every family): Flow-GRPO's clipped ratio, decoupled for staleness.
- ``grpo_guard`` (:mod:`.grpo_guard`, flow, SDE steps): GRPO-Guard's normalised ratio (RatioNorm) and 1/|dt|
  step reweighting on flow_grpo's decoupled clipped ratio; ``prox`` may also be its ``proximal`` pass.
- ``nft`` (:mod:`.nft`, flow): DiffusionNFT's likelihood-free forward-process loss on the final latents of ODE
  samples (``uses_log_probs = False``: no prox/ref log-probs; ``prox`` is ``"forward"`` or its ``proximal`` pass).

Which families an objective serves is :data:`editrl.common.config.OBJECTIVES` (the config check reads it without
importing torch).
"""

from __future__ import annotations

from typing import Any

from editrl.common.config import OBJECTIVES
from editrl.learner.objectives.flow_grpo import FlowGRPO
from editrl.learner.objectives.grpo_guard import GRPOGuard
from editrl.learner.objectives.nft import NFT

_CLASSES: dict[str, type] = {cls.name: cls for cls in (FlowGRPO, GRPOGuard, NFT)}


def make_objective(lcfg: Any) -> Any:
    """The objective ``lcfg.objective`` names (the config check already refused unknown names and families)."""
    cls = _CLASSES.get(lcfg.objective)
    if cls is None:
        raise ValueError(f"learner.objective: {lcfg.objective!r} is not implemented; one of {sorted(_CLASSES)}")
    assert tuple(cls.families) == tuple(OBJECTIVES[cls.name]), (cls.name, cls.families)
    return cls(lcfg) if _takes_config(cls) else cls()


def _takes_config(cls: type) -> bool:
    import inspect

    return len(inspect.signature(cls).parameters) > 0
