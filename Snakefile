# gram: the GRAM pipeline. Run `snakemake --cores all` (add `--use-conda` for per-rule environments).
# The active profile is `profile:` in params.yaml (or `--config profile=NAME`); every rule runs a
# `gram <stage>` command, the same one dvc.yaml runs (tests/test_pipeline_parity.py checks this).
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "params.yaml"


validate(config, "workflow/schemas/params.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/targets.smk"
include: "workflow/rules/resources.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/backbone.smk"
include: "workflow/rules/structure.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tune.smk"
include: "workflow/rules/tpt.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        report_targets(),
