# emoji: npm packages into shards; paper: fetch missing datasets (checksummed; manual steps stop it),
# list them and resolve the corpus shards (gram/data/paper.py). The runtime bounds the paper's fetch.
# The corpus input (the opt-in img2dataset run below) is Snakemake's only.
rule download:
    input:
        **stage_inputs("download", corpus=img2dataset_summary),
    output:
        **stage_outputs("download"),
    log:
        stage_log("download"),
    conda:
        "../envs/cpu.yaml"
    threads: 1
    resources:
        mem_mb=memory(2000),
        runtime=24 * 60,
    params:
        **stage_params("download"),
    shell:
        stage_cmd("download")


# Opt-in (data.paper.img2dataset.enabled): the corpus shards from a caption/URL table. Its output is
# the summary beside the shard folder, not the folder: a rerun then keeps the finished shards
# (img2dataset's incremental mode). No conda env: img2dataset installs only with --no-deps next to
# our pins (docs/paper-scale.md). DVC cannot make a stage conditional: run `gram img2dataset` once.
if img2dataset_enabled(PROFILE):

    rule img2dataset:
        input:
            sources("data/img2dataset.py"),
            table=PARAMS.active().data.paper.img2dataset.url_list,
        output:
            img2dataset_summary(None)[0],
        log:
            f"logs/{PROFILE}/img2dataset.log",
        threads: PARAMS.active().data.paper.img2dataset.processes
        resources:
            mem_mb=16000,
            runtime=24 * 60,
        params:
            img2dataset=config[PROFILE]["data"]["paper"]["img2dataset"],
        shell:
            f"gram img2dataset --params params.yaml --profile {PROFILE} --log {{log}}"
