# Test-time tuning (gram/tpt.py): one job per (dataset, test-time method, seed) of grid.tpt, scoring
# every domain of <profile>.tpt.domains. A method that starts from a few-shot-tuned prompt reads the
# few-shot prompt of grid.transfer (same seed); a GRAM one reads its recipe's meta-training output.


rule tpt:
    input:
        sources(
            "tpt.py",
            "backbone.py",
            "cluster.py",
            "data/__init__.py",
            "data/datasets.py",
            "data/fetch.py",
            "data/fewshot.py",
            "data/names.py",
            "data/paper.py",
            "data/shards.py",
            "embed.py",
            "evaluate.py",
            "images.py",
            "io.py",
            "prompts",
            "prototypes.py",
            "regulator.py",
            "tensorio.py",
            "tune.py",
        ),
        datasets="data/{profile}/datasets",
        shards="data/{profile}/shards",
        backbone="models/{profile}/backbone",
        prototypes="data/{profile}/prototypes",
        extra=tpt_input,
    output:
        "results/{profile}/tpt/{dataset}/{method}/s{seed}.json",
    log:
        "logs/{profile}/tpt/{dataset}/{method}/s{seed}.log",
    conda:
        "../envs/gpu.yaml"
    threads: 4
    resources:
        mem_mb=memory(8000, tpt_images, backbone=4),
        runtime=720,
        gpu=1,
    params:
        tpt=section("tpt"),
        device=section("backbone", "device"),
        dtype=section("backbone", "dtype"),
        extra=tpt_arg,
    shell:
        "gram tpt --params params.yaml --profile {wildcards.profile} --dataset {wildcards.dataset} --method {wildcards.method} --seed {wildcards.seed} --data data/{wildcards.profile} --backbone models/{wildcards.profile}/backbone --prototypes data/{wildcards.profile}/prototypes --views-cache results/{wildcards.profile}/.tpt-views --out {output}{params.extra} --log {log}"


rule tpt_report:
    input:
        sources("report.py", "io.py", "tables.py"),
        runs=tpt_files,
    output:
        md="results/{profile}/test_time.md",
        csv=report(
            "results/{profile}/test_time.csv",
            caption="../report/test_time.rst",
            category="Test-time tuning",
        ),
        png=report(
            "results/{profile}/test_time.png",
            caption="../report/test_time.rst",
            category="Test-time tuning",
        ),
        timings="results/{profile}/test_time_timings.csv",
    log:
        "logs/{profile}/tpt-report.log",
    conda:
        "../envs/cpu.yaml"
    threads: 1
    resources:
        mem_mb=memory(2000),
        runtime=30,
    params:
        grid=config["grid"]["tpt"],
        seeds=config["grid"]["seeds"],
        domains=section("tpt", "domains"),
    shell:
        "gram tpt-report --params params.yaml --profile {wildcards.profile} --tpt results/{wildcards.profile}/tpt --out results/{wildcards.profile} --log {log}"
