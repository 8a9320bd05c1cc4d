# The result tables and plots (gram/report.py, gram/tables.py); the report entries of `snakemake
# --report` are the outputs named here with their caption and category.
REPORT = {
    "zero_shot_csv": report_entry("zero_shot", "Zero-shot"),
    "zero_shot_png": report_entry("zero_shot", "Zero-shot"),
    "backbone_png": report_entry("backbone", "Backbone"),
    "few_shot_csv": report_entry("few_shot", "Protocols", "Few-shot"),
    "few_shot_png": report_entry("few_shot", "Protocols", "Few-shot"),
    "base_to_new_csv": report_entry("base_to_new", "Protocols", "Base-to-new"),
    "cross_dataset_csv": report_entry("cross_dataset", "Protocols", "Cross-dataset"),
    "domain_generalisation_csv": report_entry(
        "domain_generalisation", "Protocols", "Domain generalisation"
    ),
    "clustering_csv": report_entry("clustering", "Meta-training data"),
    "clustering_png": report_entry("clustering", "Meta-training data"),
    "meta_training_png": report_entry("meta_training", "Meta-training"),
}


rule report:
    input:
        **stage_inputs("report", evals=eval_dirs, runs=run_files, meta=meta_dirs),
    output:
        **stage_outputs("report", **REPORT),
    log:
        stage_log("report"),
    conda:
        "../envs/cpu.yaml"
    threads: 1
    resources:
        mem_mb=memory(2000),
        runtime=30,
    params:
        **stage_params("report"),
    shell:
        stage_cmd("report")
