"""The application: what a person runs (the ``byol-pytorch`` command and its sub-commands).

``cli`` (the command), ``train`` and ``recipe`` (``byol-pytorch train``), ``demo``,
``metrics`` (metrics.jsonl, TensorBoard), ``plots`` (curves.png, views.png),
``fashion_mnist`` (the demo's data) and ``errors`` (one-line errors and warnings).
The application imports the core (``byol_pytorch.*``); the core never imports it.
"""
