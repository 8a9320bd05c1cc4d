# Zero-shot methods (grid.methods): one job each, every dataset, domain and protocol (gram/evaluate.py).
rule evaluate:
    input:
        **stage_inputs("evaluate"),
    output:
        **stage_outputs("evaluate"),
    log:
        stage_log("evaluate"),
    conda:
        "../envs/gpu.yaml"
    threads: 4
    resources:
        mem_mb=memory(4000, evaluate_images, backbone=4),
        runtime=240,
        gpu=1,
    params:
        **stage_params("evaluate"),
    shell:
        stage_cmd("evaluate")
