"""SAELens shells around the allocation rules: one module per architecture.

Each module is a plugin of this project's host (it has ``@hookimpl register_architectures``),
written exactly as a third-party plugin would be, and holds, SAELens-style, a config dataclass,
an inference class and a training class. Two shared modules: ``_step`` (the training step every
training class runs) and ``kinds`` (the three kinds of rule a training class declares as
``rule_kind``).
"""
