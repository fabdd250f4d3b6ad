"""InstructBLIP: a frozen image encoder, an instruction-aware Q-Former and a frozen LLM.

``from instructblip import InstructBlip`` is the public entry point; it is imported lazily so that light
modules (the shard record, the metrics) do not pull in torch and transformers.
"""

__version__ = "0.1.0"
__all__ = ["InstructBlip", "InstructBlipConfig"]


def __getattr__(name: str):
    if name in __all__:
        from instructblip.model import instructblip as _model

        return getattr(_model, name)
    raise AttributeError(f"module 'instructblip' has no attribute {name!r}")
