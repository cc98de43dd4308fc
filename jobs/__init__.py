"""Entrypoints that ``ray job submit`` (or ``make demo``) runs; each is a thin shell over ``pipeline``."""
