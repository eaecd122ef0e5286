"""magic: exact data attribution by differentiating through training (MAGIC).

The layers, each importing only the ones below it (tests/test_structure.py keeps it so):

    cli.py, api.py      the faces: the Typer commands and the Python API, thin over the stages
    stages/             one module per command: read + verify inputs, call the core, write;
                        each returns a frozen, typed result (TrainResult, AttributeResult, ...)
    run_dir.py          every path inside a run directory, sidecars, locks (storage.py: bytes on disk)
    launcher.py         SLURM job arrays; workers.py: local processes; plots.py: figures
    config.py           compose + validate the Hydra config; plugins.py: user code enters here
    core/               the computation, no files: losses, the pure step and Problem, optimizers,
                        checkpoint schedules, the reverse pass, the methods, metrics
    models/ data/       registries: name -> builder
    names.py, contracts.py, errors.py, readers.py, ...   the leaves

The Python API is this package's face: magic_cli.compose(...), magic_cli.train(cfg), ... (see
api.py). They are imported on first use, so `import magic_cli` (and `magic --help`) stays instant.
"""

__version__ = "0.1.0"

_API = ("compose", "train", "attribute", "explain", "retrain_ground_truth", "tune", "score", "smoothness",
        "smoothness_sweep", "load_run")


def __getattr__(name: str):
    if name in _API:
        from magic_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'magic_cli' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
