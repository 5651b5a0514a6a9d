"""Expert-load statistics, shared by training's logs and `pesc report` (numpy only)."""
from __future__ import annotations

import numpy as np


def load_imbalance(load) -> np.ndarray:
    """The busiest expert's share over the mean share 1/E (1.0 = perfectly balanced, E = every
    token on one expert), over axis 1, the experts: [layers, experts] gives [layers];
    [layers, experts, steps] gives [layers, steps]."""
    load = np.asarray(load, dtype=np.float64)
    return load.max(axis=1) * load.shape[1]
