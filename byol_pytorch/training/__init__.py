"""The training runtime: what runs a BYOL learner for many steps and judges what it learnt.

* ``recipe``: the run's recipe, one frozen typed dataclass (model, sizes, optimiser, schedules,
  views, seed), saved in checkpoints as plain values;
* ``models``: backbones by name, the learner of a recipe, the export of the trained backbone;
* ``engine``: the one training loop (precision, accumulation, EMA, stop signals, hooks);
* ``optim``: LARS, parameter groups, warm-up + cosine, the optimisers' default recipes;
* ``distributed``: torchrun's process group and this process's device;
* ``checkpoint``: atomic, ``weights_only`` checkpoints and RNG state;
* ``trainer``: the drop-in ``BYOLTrainer`` of lucidrains/byol-pytorch;
* ``evaluate`` (features, kNN, linear probe, collapse report) and ``validation`` (the kNN
  monitor on labelled data of any form).

It imports the method (``byol_pytorch.byol`` and its parts) and the data layer, never the
application.
"""

__all__: list[str] = []
