# What each job asks of a scheduler (SLURM through the executor plugin; locally Snakemake only counts
# them). Memory grows with what a job loads: the backbone's weights and, where a stage holds them, the
# embeddings. GPU rules declare `gpu=1` (the plugin turns it into `--gpus=1`; `gpu_model` adds a type);
# `--set-resources meta:gpu=4` meta-trains on four GPUs of one node (gram meta starts one process per
# visible GPU). Partition, account and GPU type come from the command line or a profile, never from
# params.yaml. Runtimes (minutes) are upper bounds for the paper profile on one GPU; see the README.


def _size_mb(path):
    """Size in MB of a file or of everything under a directory (0 while it does not exist yet)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size / 2**20
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20
    return 0.0


def memory(base_mb, **per_input):
    """A `mem_mb` callable: base_mb plus factor x the size of each named input (e.g. backbone=4)."""

    def mem_mb(wildcards, input):
        extra = sum(f * _size_mb(getattr(input, name)) for name, f in per_input.items())
        return int(base_mb + extra)

    return mem_mb
