"""What both runners share and neither owns: config reading, scenario, topology and
routing, models and layers, the Plan and its schedule, the Trace and the metrics read
from it.  Imports nothing above it (import-linter contract in pyproject)."""
