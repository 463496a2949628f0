"""The user's workflow: ``train`` (SAELens's CLI options + ours), ``push`` to the Hub, ``load`` back.

Each module registers one ``sae-allocators`` subcommand and offers the same as a Python function.
"""
