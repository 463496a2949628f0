"""SAELens shells around the allocation rules: one module per architecture.

Each module is a plugin of this project's host (it has ``@hookimpl register_architectures``),
written exactly as a third-party plugin would be, and holds, SAELens-style, a config dataclass,
an inference class and a training class.
"""
