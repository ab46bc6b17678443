"""Embedded workloads: the default one ``advisor run`` uses, importable as ``module:function``."""
