rule backbone:
    input:
        sources("backbone.py", "data/shards.py", "data/names.py", "io.py"),
        shards="data/{profile}/shards",
    output:
        directory("models/{profile}/backbone"),
    log:
        "logs/{profile}/backbone.log",
    conda:
        "../envs/gram.yaml"
    threads: workflow.cores
    params:
        backbone=section("backbone"),
        pretrain_vendors=section("data", "vendors", "pretrain"),
    shell:
        "gram backbone --params params.yaml --profile {wildcards.profile} --data data/{wildcards.profile} --out models/{wildcards.profile}/backbone --log {log}"
