"""Studies that run parts of the pipeline under changed assumptions (paper §5).

Each is a command that reads a finished build's products and writes its own tables and
figures under ``<output>/studies/<name>/``, where the report finds them:

* :mod:`mastar_vac.studies.semi_empirical` — §5.2: empirical-only, semi-empirical and
  synthetic-only emulators fitted to the same held-out real stars.
"""
