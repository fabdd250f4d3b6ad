"""Training: the Lightning modules and data module of every stage, the Hydra entry point's machinery.

Importing this package registers the OmegaConf resolvers the configs use (``${mul:a,b}``).
"""

from omegaconf import OmegaConf

OmegaConf.register_new_resolver("mul", lambda *values: int(__import__("math").prod(int(v) for v in values)), replace=True)

# The hydra/launcher presets' resolvers (${instructblip.tasks_per_node:...}): trainer config -> SLURM resources.
from instructblip.train import slurm as _slurm  # noqa: E402,F401
