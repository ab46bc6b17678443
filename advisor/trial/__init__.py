"""One trial, isolated: ``cache`` (what the study prepared on this machine: data maps, the
workload, the baseline's weights, logs) -> ``spec`` (what a trial process is told) ->
``runner`` (starts and watches the process) -> ``process`` (its entry point) -> ``pipeline``
(prune, fine-tune with ``train``, quantize and compile through ``compress``, then
``measure`` and ``profile``).
"""
