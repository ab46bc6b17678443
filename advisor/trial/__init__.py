"""One trial: an isolated process that fine-tunes the workload under a set of knobs
(``train``), then measures it (``measure``, ``profile``); ``runner`` starts and watches it.
"""
