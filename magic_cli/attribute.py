"""The `magic attribute` stage: scores for the requested test ids by one method, resumable.

    attribute/<method>/test_<id>.npy   (N,) scores of one test id (skipped when present)
    attribute/<method>/scores.npy      (N, n_ids) for the requested ids, in their order
    attribute/<method>/scores.json     test_ids, output, method, sign, checkpoint, fingerprint, seconds, ...

MAGIC (metagrad.py) and the baselines (baselines.py) share the layout and the sign
convention scores[i, j] = d f_j / d w_i, so `magic score` treats them alike.
"""

from __future__ import annotations

import time

from magic_cli.train import Problem


def attribute_stage(config, run, test_ids_spec: str, overwrite: bool = False, progress_factory=None) -> dict:
    """Compute the missing test ids with config.attribute.method; merge; return the sidecar."""
    import dataclasses

    import numpy as np

    from magic_cli.baselines import BASELINES
    from magic_cli.config import parse_test_ids
    from magic_cli.determinism import enable_determinism
    from magic_cli.metagrad import ReverseStats, load_final_and_stored, reverse_pass
    from magic_cli.progress import no_progress
    from magic_cli.run_dir import StageError, load_json, load_npy, save_json, save_npy

    # config.py admits only float32/float64: half precision gives meaningless metagradients.
    enable_determinism(config.device, config.threads)
    record = run.require_trained(config)
    problem = Problem.build(config)
    ids = parse_test_ids(test_ids_spec, problem.dataset.n_test)
    method, output = config.attribute.method, config.attribute.output
    options = {"trak": config.attribute.trak, "ekfac": config.attribute.ekfac}.get(method)
    options = dataclasses.asdict(options) if options else {}
    # The per-id files are valid only for the settings that produced them.
    settings = {"output": output, "options": options, "fingerprint": record["fingerprint"]}
    if run.attribute_settings(method).is_file() and load_json(run.attribute_settings(method)) != settings:
        if not overwrite:
            raise StageError(f"{run.attribute_dir(method)} holds scores computed with other settings "
                             f"({load_json(run.attribute_settings(method))}); pass --overwrite to recompute")
        for path in run.attribute_dir(method).glob("test_*.npy"):
            path.unlink()
    save_json(run.attribute_settings(method), settings)
    todo = [i for i in ids if overwrite or not run.test_scores(method, i).is_file()]
    stats = ReverseStats(steps=problem.total_steps)
    if todo:
        final, stored = load_final_and_stored(problem, run)
        size = config.attribute.batch_size if method == "magic" else len(todo)
        for start in range(0, len(todo), size):
            chunk = todo[start:start + size]
            label = f"{method} {len(chunk)} id{'s' if len(chunk) > 1 else ''} ({start + len(chunk)}/{len(todo)})"
            if method == "magic":
                with (progress_factory or no_progress)(label, problem.total_steps) as advance:
                    scores, st = reverse_pass(problem, final, stored, config.checkpoint.name, config.checkpoint.k,
                                              chunk, output, progress=advance)
                stats.peak_states = max(stats.peak_states, st.peak_states)
                stats.forward_steps += st.forward_steps
                seconds = st.seconds
                scores = scores.cpu().numpy()
            else:
                begin = time.perf_counter()
                scores = BASELINES[method](problem, final, chunk, output, options).T.to(problem.dtype).cpu().numpy()
                seconds = time.perf_counter() - begin
            for j, test_id in enumerate(chunk):
                save_npy(run.test_scores(method, test_id), scores[j])
            stats.seconds += seconds
    merged = np.stack([load_npy(run.test_scores(method, i)) for i in ids], axis=1)  # (N, n_ids)
    sidecar = {
        "method": method,
        "test_ids": ids,
        "output": output,
        "options": options,
        "sign": "d output / d weight",
        "checkpoint": {"name": config.checkpoint.name, "k": config.checkpoint.k},
        "fingerprint": record["fingerprint"],
        "seconds": stats.seconds,
        "ids_computed": len(todo),
        "peak_states": stats.peak_states,
        "forward_steps": stats.forward_steps,
        "steps": problem.total_steps,
        "batch_size": config.attribute.batch_size,
        "shape": list(merged.shape),
        "dtype": str(merged.dtype),
    }
    save_npy(run.scores_npy(method), merged)
    save_json(run.scores_json(method), sidecar)
    return sidecar
