# The meta-training data structure: embed -> cluster (CHC) -> tasks, prototypes (gram/embed.py,
# gram/cluster.py, gram/tasks.py, gram/prototypes.py). The corpus is data.vendors.meta's shards.


rule embed:
    input:
        **stage_inputs("embed"),
    output:
        **stage_outputs("embed"),
    log:
        stage_log("embed"),
    conda:
        "../envs/gpu.yaml"
    threads: 4
    resources:
        mem_mb=memory(4000, backbone=4),
        runtime=720,
        gpu=1,
    params:
        **stage_params("embed"),
    shell:
        stage_cmd("embed")


rule cluster:
    input:
        **stage_inputs("cluster"),
    output:
        **stage_outputs("cluster"),
    log:
        stage_log("cluster"),
    conda:
        "../envs/gpu.yaml"
    threads: 4
    resources:
        mem_mb=memory(4000, embed=3),
        runtime=240,
        gpu=1,
    params:
        **stage_params("cluster"),
    shell:
        stage_cmd("cluster")


rule tasks:
    input:
        **stage_inputs("tasks"),
    output:
        **stage_outputs("tasks"),
    log:
        stage_log("tasks"),
    conda:
        "../envs/cpu.yaml"
    threads: 1
    resources:
        mem_mb=memory(2000, chc=2),
        runtime=60,
    params:
        **stage_params("tasks"),
    shell:
        stage_cmd("tasks")


rule prototypes:
    input:
        **stage_inputs("prototypes"),
    output:
        **stage_outputs("prototypes"),
    log:
        stage_log("prototypes"),
    conda:
        "../envs/cpu.yaml"
    threads: 1
    resources:
        mem_mb=memory(2000, embed=2),
        runtime=60,
    params:
        **stage_params("prototypes"),
    shell:
        stage_cmd("prototypes")
