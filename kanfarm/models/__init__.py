"""Networks of the study: KAN (efficient-kan layers with a fast uniform-grid path), MLP, MLP-Wide."""
from kanfarm.models.bspline import cox_de_boor_basis
from kanfarm.models.build import build_model, count_params, model_widths, param_count
from kanfarm.models.kan import KAN, KANLinear
from kanfarm.models.mlp import MLP

__all__ = ["KAN", "KANLinear", "MLP", "build_model", "count_params", "cox_de_boor_basis",
           "model_widths", "param_count"]
