"""`gram <stage>`: one subcommand per pipeline stage. [ours]

Every stage takes `--params params.yaml --profile P`, explicit input/output paths and `--log`.
Snakemake rules and DVC stages run exactly these commands (see `dvc.yaml`, `workflow/rules/`).
The stages are imported by name when run, so that `gram --help` does not import torch; they share
their flags through `gram.stage`, never through this module (the CLI is the top layer).
"""

from __future__ import annotations

import importlib
import logging
import sys
import time

from gram import config as C
from gram.io import job_threads

# stage name -> module whose `main(argv)` runs it (or "module:function"); a literal table, no registry
STAGES = {
    "download": ("gram.data.download", "fetch the data of a profile: corpus shards and classification datasets"),
    "backbone": ("gram.backbone", "load a CLIP (hub id or directory) or pretrain a small one"),
    "embed": ("gram.embed", "embed the meta-training corpus with the frozen backbone (per shard, resumable)"),
    "cluster": ("gram.cluster", "Cross-Modal Hierarchical Clustering of the corpus, complexity, quality"),
    "tasks": ("gram.tasks", "sample complexity-informed meta-tasks (support/query ids) from the hierarchy"),
    "prototypes": ("gram.prototypes", "multi-level cluster prototypes for the test-time regulator"),
    "meta": ("gram.meta", "meta-train a prompt initialisation θ and gradient regulator ψ_φ (GRAM)"),
    "evaluate": ("gram.evaluate", "score a zero-shot method on every dataset, domain and protocol"),
    "tune": ("gram.tune", "tune one method for one (protocol, dataset, shots, seed) and score it"),
    "tpt": ("gram.tpt", "test-time prompt tuning (TPT, GRAM's structure-induced regulator) of one method and seed"),
    "report": ("gram.report", "render the result tables and plots"),
    "tpt-report": ("gram.report:main_tpt", "render the test-time table of grid.tpt"),
    "draws": ("gram.draws", "tables over several backbone draws (pipeline runs of one grid): per draw and pooled"),
    "schema": ("gram.schema", "write the JSON schema of params.yaml (for Snakemake)"),
    "dvc": ("gram.stages", "write dvc.yaml from the stage table (gram/stages.py)"),
    "check-data": ("gram.data.check", "check that the paper profile's datasets are in place and readable"),
    "fetch-data": ("gram.data.fetch", "download one paper-profile dataset into CoOp's layout (checksummed)"),
    "img2dataset": ("gram.data.img2dataset", "build the corpus shards from a caption/URL table (opt-in, resumable)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, STAGES))
        lines = [f"  {name:<{width}}  {help}" for name, (_, help) in STAGES.items()]
        print("usage: gram <stage> [--help] ...\n\nGRAM pipeline stages:\n" + "\n".join(lines)
              + "\n\nEach stage reads params.yaml; `gram <stage> --help` lists its arguments.")
        return 0
    if argv[0] not in STAGES:
        print(f"gram: unknown stage {argv[0]!r} (one of {', '.join(STAGES)})", file=sys.stderr)
        return 2
    target, _, func = STAGES[argv[0]][0].partition(":")  # "module" (its main) or "module:function"
    entry = getattr(importlib.import_module(target), func or "main")
    if "torch" in sys.modules:  # a stage that computes: as many threads as its job was given
        sys.modules["torch"].set_num_threads(job_threads())
    t0 = time.time()
    try:
        entry(argv[1:])
    except (C.ConfigError, OSError, KeyError, ValueError, RuntimeError) as e:
        # expected failures (bad params, missing or damaged inputs, a full disk, a missing tool) get one clear line;
        # with -v/--verbose the traceback too
        if "-v" in argv or "--verbose" in argv:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"gram {argv[0]}: error: {msg}", file=sys.stderr)
        return 1
    logging.getLogger("gram").info("%s finished in %.1f s", argv[0], time.time() - t0)
    return 0
