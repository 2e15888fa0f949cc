"""How a spectral layer computes: exact compute paths (``dispatch``), their autograd pieces
(``functions``), the cost model that ranks them and that ``auto`` follows (``cost_model``), and the
explicit measurement of the fastest path on this machine (``autotune``)."""

from .cost_model import DEVICE_COSTS, DeviceCosts, choose_path, estimate_costs
from .dispatch import PATHS, available_paths, run_path
from .functions import matrix

__all__ = ["DEVICE_COSTS", "DeviceCosts", "PATHS", "available_paths", "choose_path", "estimate_costs", "matrix", "run_path"]
