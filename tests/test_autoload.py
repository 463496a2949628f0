"""Unit tests of the post-import hook ``sae_allocators_autoload.py`` (mutation target ``autoload``)."""
