"""The PTI library, in layers that import downward only (docs/architecture.md):
``engine`` (math, models, stored form), ``io`` (storage, images), ``batch`` (Ray stages, driver,
jobs), ``world`` (the rendered world, its trainer, the tiny offline model)."""
