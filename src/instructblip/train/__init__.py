"""Training: the Lightning modules and data module of every stage, the Hydra entry point's machinery.

Importing this package registers the OmegaConf resolvers the configs use (``${mul:a,b}``).
"""

from omegaconf import OmegaConf

OmegaConf.register_new_resolver("mul", lambda *values: int(__import__("math").prod(int(v) for v in values)), replace=True)
