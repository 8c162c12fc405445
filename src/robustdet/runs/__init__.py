"""Run directories and what is built on them: reading them (``reader``, the one reader), which settings make
a result (``settings``), the comparison over seeds and its tables (``compare``), and sweeps (``sweep_spec``:
the grid and its cells; ``sweep``: training the cells here; ``launch``: in processes or submitit jobs;
``submit``: one SLURM or local job per cell). Import the modules themselves; this package re-exports nothing.
"""
