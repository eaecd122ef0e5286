"""magic: exact data attribution by differentiating through training (MAGIC).

The package reads as the pipeline it implements:

    config -> data -> models -> optim -> train -> replay -> metagrad
           -> ground_truth -> metrics -> report

`cli.py` is a thin Typer front over these modules. torch is imported inside
functions of the modules that need it, never here, so `magic --help` is instant.
"""

__version__ = "0.1.0"
