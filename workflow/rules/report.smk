# The result tables and plots (gram/report.py, gram/tables.py); the report entries of `snakemake
# --report` are the outputs named here with their caption and category.
def _entry(name, category, subcategory=None):
    extra = {"subcategory": subcategory} if subcategory else {}
    return dict(caption=f"../report/{name}.rst", category=category, **extra)


REPORT = {
    "zero_shot_csv": _entry("zero_shot", "Zero-shot"),
    "zero_shot_png": _entry("zero_shot", "Zero-shot"),
    "backbone_png": _entry("backbone", "Backbone"),
    "few_shot_csv": _entry("few_shot", "Protocols", "Few-shot"),
    "few_shot_png": _entry("few_shot", "Protocols", "Few-shot"),
    "base_to_new_csv": _entry("base_to_new", "Protocols", "Base-to-new"),
    "cross_dataset_csv": _entry("cross_dataset", "Protocols", "Cross-dataset"),
    "domain_generalisation_csv": _entry(
        "domain_generalisation", "Protocols", "Domain generalisation"
    ),
    "clustering_csv": _entry("clustering", "Meta-training data"),
    "clustering_png": _entry("clustering", "Meta-training data"),
    "meta_training_png": _entry("meta_training", "Meta-training"),
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
