"""The computation, and no files: losses and outputs, the training state and pure step
(`Problem`), optimizers and schedules, checkpoint schedules, the reverse pass, the attribution
methods behind one interface, and the metrics. Every module imports torch at its top; nothing
here reads or writes a run directory (the stages do)."""
