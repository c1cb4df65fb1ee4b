"""edgelm: an on-device LLM runtime for the Gemma 3 and Gemma 3n families."""

__version__ = "0.1.0"

__all__ = ["Engine", "SamplerConfig", "EdgelmError", "__version__"]


def __getattr__(name):  # lazy, so `import edgelm` stays light
    if name == "Engine":
        from .runtime.engine import Engine

        return Engine
    if name == "SamplerConfig":
        from .runtime.sampler import SamplerConfig

        return SamplerConfig
    if name == "EdgelmError":
        from .errors import EdgelmError

        return EdgelmError
    raise AttributeError(name)
