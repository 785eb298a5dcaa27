"""What research scripts and benchmarks share, kept out of the user package.

``stmae`` holds only what a user runs; the protocols, ablation switches and baselines that
only experiments need live here (docs/research.md says which experiment uses what). It is
installed editable by ``make install`` as ``stmae_research``.
"""
