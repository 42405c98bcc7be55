"""edgetune's benchmarks: the recipes that compare edgetune with its alternatives (PyTorch eager,
llama.cpp on the same fine-tuned model, LoRA/QLoRA/DoRA, the encoder's precisions), built on
edgetune's own instruments (``edgetune.device.measure``, ``edgetune.device.metrics``,
``edgetune.validate.reference``, ``edgetune.validate``). Not part of the installed package.

Run from the repository root (``make bench``, ``make bench-quick``, ``make bench-scale``)::

    .venv/bin/python -m benchmarks.run [--quick] ...      # every benchmark number, runs/bench
    .venv/bin/python -m benchmarks.report --readme         # README's table from runs/bench/results.json
    .venv/bin/python -m benchmarks.scale --list           # stage cost as models grow, runs/scale

``run`` orchestrates the sections: ``machine`` (machine, versions), ``exports`` (cached exports,
each in a subprocess), ``measure`` (speed and quality of one export), ``variants`` (what ``export``
offers, and the session options tried), ``llm`` (the LLM section), ``peers`` (edgetune vs llama.cpp),
``finetune_bench`` and ``encoder_bench``; ``common`` holds what they share (ROOT, the target, the log).
Workers run as ``python -m benchmarks.<name>`` with the repository root on PYTHONPATH.
"""
