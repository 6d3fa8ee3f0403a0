"""Networks of the study: KAN (efficient-kan layers with a fast uniform-grid path), MLP, MLP-Wide.

Widths and parameter counts (``model_widths``, ``param_count``) need no torch; the networks are
imported when first asked for, so that commands that only count parameters do not import torch.
"""
from kanfarm.models.widths import model_widths, param_count

#: names given from the modules that need torch, imported when first asked for
_LAZY = {"cox_de_boor_basis": "kanfarm.models.bspline", "build_model": "kanfarm.models.build",
         "count_params": "kanfarm.models.build", "KAN": "kanfarm.models.kan", "KANLinear": "kanfarm.models.kan",
         "MLP": "kanfarm.models.mlp"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["KAN", "KANLinear", "MLP", "build_model", "count_params", "cox_de_boor_basis",
           "model_widths", "param_count"]
