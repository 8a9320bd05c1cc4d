# What each job asks of a scheduler (SLURM through the executor plugin; locally Snakemake only counts
# them). Memory grows with what a job loads: the backbone's weights and, where a stage holds them, the
# embeddings or the paper profile's decoded images. GPU rules declare `gpu=1` (the plugin turns it
# into `--gpus=1`; `gpu_model` adds a type); `--set-resources meta:gpu=4` meta-trains on four GPUs of
# one node (gram meta starts one process per visible GPU). Partition, account and GPU type come from
# the command line or a profile, never from params.yaml. Runtimes (minutes) are upper bounds for the
# paper profile on one GPU; see docs/cluster.md.


def _size_mb(path):
    """Size in MB of a file or of everything under a directory (0 while it does not exist yet)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size / 2**20
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20
    return 0.0


def memory(base_mb, images=None, **per_input):
    """A `mem_mb` callable: base_mb plus factor x the size of each named input (e.g. backbone=4),
    plus, with `images` ((wildcards) -> (datasets, shots)), twice the paper profile's images the job
    decodes (`gram.data.datasets.decoded_mb`: the largest test split, and the shots; twice, for the copy a
    scorer keeps of the classes it scores). ImageNet-Sketch at 224 px: 2 x 7.3 GB."""

    def mem_mb(wildcards, input):
        extra = sum(f * _size_mb(getattr(input, name)) for name, f in per_input.items())
        if images is not None:
            from gram.data.datasets import decoded_mb

            names, shots = images(wildcards)
            data_dir = Path(input.datasets).parent
            extra += 2 * decoded_mb(data_dir, names, input.backbone, shots=shots)
        return int(base_mb + extra)

    return mem_mb


def tuned_images(wildcards):
    """What a few-shot or base-to-new job decodes: its dataset's test split and its shots."""
    return [wildcards.dataset], int(wildcards.shots)


def transfer_images(wildcards):
    """What a cross-dataset or domain-generalisation job decodes: the test splits it scores."""
    return [wildcards.dataset] + list(
        PARAMS.active(wildcards.profile).protocols.cross_dataset
    ), 0


def evaluate_images(wildcards):
    """What a zero-shot evaluation decodes: every dataset it scores, one split at a time."""
    prof = PARAMS.active(wildcards.profile)
    names = [
        *prof.evaluate.datasets,
        *PARAMS.grid_of(wildcards.profile).datasets,
        *prof.protocols.cross_dataset,
    ]
    return list(dict.fromkeys(names)), 0


def tpt_images(wildcards):
    """What a test-time job decodes: its dataset's test split of each domain."""
    return [wildcards.dataset], 0
