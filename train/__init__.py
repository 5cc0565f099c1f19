"""The learners. Modules that need torch import it themselves; this package imports nothing heavy,
so the numpy learners (RAIL, the linear DDAS gate) run on a device without torch."""
