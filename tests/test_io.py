"""Fast unit tests of ``sae_allocators/io.py`` (atomic writes) and ``sae_allocators/sae_folder.py``
(SAE-folder checks), in this process: the mutation target ``io`` runs them per mutant."""
