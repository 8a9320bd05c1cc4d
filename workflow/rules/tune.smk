# Tuned methods under the four protocols: one job per (protocol, dataset, method, shots, seed).
# GRAM methods (grid.gram) also read the meta-train output of their recipe (`--meta`: meta_input,
# meta_arg). Few-shot jobs also keep the tuned prompt; cross-dataset and domain-generalisation jobs
# score the prompt of grid.transfer without tuning. GRAM meta-training (grid.meta) is rule meta.


rule few_shot:
    input:
        **stage_inputs("few_shot", meta=meta_input),
    output:
        **stage_outputs("few_shot"),
    log:
        stage_log("few_shot"),
    conda:
        "../envs/gpu.yaml"
    threads: 4
    resources:
        mem_mb=memory(4000, tuned_images, backbone=4),
        runtime=240,
        gpu=1,
    params:
        **stage_params("few_shot", extra=meta_arg),
    shell:
        stage_cmd("few_shot")


rule base_to_new:
    input:
        **stage_inputs("base_to_new", meta=meta_input),
    output:
        **stage_outputs("base_to_new"),
    log:
        stage_log("base_to_new"),
    conda:
        "../envs/gpu.yaml"
    threads: 4
    resources:
        mem_mb=memory(4000, tuned_images, backbone=4),
        runtime=240,
        gpu=1,
    params:
        **stage_params("base_to_new", extra=meta_arg),
    shell:
        stage_cmd("base_to_new")


rule transfer:
    input:
        **stage_inputs("transfer"),
    output:
        **stage_outputs("transfer"),
    log:
        stage_log("transfer"),
    wildcard_constraints:
        protocol="cross-dataset|domain-generalisation",
    conda:
        "../envs/gpu.yaml"
    threads: 4
    resources:
        mem_mb=memory(4000, transfer_images, backbone=4),
        runtime=240,
        gpu=1,
    params:
        **stage_params("transfer"),
    shell:
        stage_cmd("transfer")


rule meta:
    input:
        **stage_inputs("meta"),
    output:
        **stage_outputs("meta"),
    log:
        stage_log("meta"),
    conda:
        "../envs/gpu.yaml"
    threads: 4
    resources:
        mem_mb=memory(8000, backbone=4, chc=1),
        runtime=1440,
        gpu=1,
    params:
        **stage_params("meta"),
    shell:
        stage_cmd("meta")
