"""Circuit Explorer: activation patching, ablation, DLA and friends over nnsight.

Import cost matters for the app's start-up, so submodules are imported on demand
(``from explorer.analyses.patching import patch_sweep``), never here.
"""

__version__ = "0.1.0"
