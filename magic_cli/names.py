"""The names a config may choose from, each listed once, here, without importing torch (so that
composing and validating a config stays instant). The modules that implement them key their
tables by these names and check at import that they cover exactly these.
"""

DTYPES = ("float32", "float64")
DEVICES = ("cpu", "cuda")
OUTPUTS = ("loss", "margin")  # attribute.output: core/losses.py OUTPUT_FUNCTIONS
LOSS_REDUCTIONS = ("mean", "sum", "token_mean")  # train.loss_reduction: core/problem.py make_grad_fn
OPTIMIZERS = ("adam", "sgd")  # optimizer.name: core/optim.py
SCHEDULES = ("constant", "onecycle", "cosine", "warmup_linear", "warmup_constant")  # optimizer.schedule.name
STRATEGIES = ("all", "sqrt", "replay", "binomial")  # checkpoint.name: core/replay.py
METHODS = ("magic", "grad-dot", "tracin", "trak", "ekfac", "source")  # attribute.method: core/methods.py ATTRIBUTORS
LAUNCHERS = ("local", "slurm")  # launcher.name: launcher.py
