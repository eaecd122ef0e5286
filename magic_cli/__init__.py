"""magic: exact data attribution by differentiating through training (MAGIC).

The package reads as the pipeline it implements:

    config -> (plugins) -> data -> models -> optim -> assemble -> train -> replay -> metagrad
           -> ground_truth -> metrics -> report          (contracts: the types they share;
                                                          run_dir: every artifact; results: reading them)

`cli.py` is a thin Typer front over these modules. torch is imported inside
functions of the modules that need it, never here, so `magic --help` is instant.
"""

__version__ = "0.1.0"


def load_run(root):
    """Read a run directory from Python: see magic_cli.stages.results (imports torch only when needed)."""
    from magic_cli.stages.results import load_run as _load_run

    return _load_run(root)
