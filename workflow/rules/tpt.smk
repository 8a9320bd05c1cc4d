# Test-time tuning (gram/tpt.py): one job per (dataset, test-time method, seed) of grid.tpt, scoring
# every domain of <profile>.tpt.domains. A method that starts from a few-shot-tuned prompt reads the
# few-shot prompt of grid.transfer (same seed); a GRAM one reads its recipe's meta-training output.
TEST_TIME = report_entry("test_time", "Test-time tuning")


rule tpt:
    input:
        **stage_inputs("tpt", extra=tpt_input),
    output:
        **stage_outputs("tpt"),
    log:
        stage_log("tpt"),
    conda:
        "../envs/gpu.yaml"
    threads: 4
    resources:
        mem_mb=memory(8000, tpt_images, backbone=4),
        runtime=720,
        gpu=1,
    params:
        **stage_params("tpt", extra=tpt_arg),
    shell:
        stage_cmd("tpt")


rule tpt_report:
    input:
        **stage_inputs("tpt_report", runs=tpt_files),
    output:
        **stage_outputs("tpt_report", csv=TEST_TIME, png=TEST_TIME),
    log:
        stage_log("tpt_report"),
    conda:
        "../envs/cpu.yaml"
    threads: 1
    resources:
        mem_mb=memory(2000),
        runtime=30,
    params:
        **stage_params("tpt_report"),
    shell:
        stage_cmd("tpt_report")
