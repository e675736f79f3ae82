"""``safemerge scan``: every candidate's ``rho`` and a threshold sweep, without merging.

:mod:`.measure` runs mergekit's plan with the method measuring only (also the first pass of the
ranking selection modes); :mod:`.outputs` turns its records into the table, CSV/JSON and PNG.
"""
