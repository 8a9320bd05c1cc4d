# Command, inputs, params, outputs and log of every rule come from the stage table (gram/stages.py),
# which also generates dvc.yaml; the rules add what only Snakemake has: threads, resources, conda.
rule backbone:
    input:
        **stage_inputs("backbone"),
    output:
        **stage_outputs("backbone"),
    log:
        stage_log("backbone"),
    conda:
        "../envs/gpu.yaml"
    threads: 4
    resources:
        mem_mb=memory(4000, shards=2),
        runtime=480,
        gpu=1,
    params:
        **stage_params("backbone"),
    shell:
        stage_cmd("backbone")
