"""megatron-core API differences between the releases the project runs on (0.16 to 0.19), in
one place. Newer releases keep the MoE aux-loss tracker in `MoEMetricsTracker` and turn the
module-level helpers into deprecated wrappers of it."""
from __future__ import annotations

from megatron.core.transformer.moe import moe_utils

_Tracker = getattr(moe_utils, "MoEMetricsTracker", None)


def moe_aux_loss_tracker() -> dict:
    """{loss name: {"values": [num_layers] tensor, "reduce_group": ..., ...}}, as logged by the
    routers since the last clear."""
    if _Tracker is not None:
        return _Tracker.get_instance().get_raw_tracker()
    return moe_utils.get_moe_layer_wise_logging_tracker()


def clear_moe_aux_losses() -> None:
    """Zeroes the logged values (the entries stay, sized by the model)."""
    if _Tracker is not None:
        _Tracker.get_instance().clear()
    else:
        moe_utils.clear_aux_losses_tracker()
