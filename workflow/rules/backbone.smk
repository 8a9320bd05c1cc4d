rule backbone:
    input:
        sources("backbone.py", "data/shards.py", "io.py"),
        shards="data/{profile}/shards",
    output:
        directory("models/{profile}/backbone"),
    params:
        backbone=section("backbone"),
        pretrain_vendors=section("data", "vendors", "pretrain"),
    threads: workflow.cores
    log:
        "logs/{profile}/backbone.log",
    conda:
        "../envs/gram.yaml"
    shell:
        "gram backbone --params params.yaml --profile {wildcards.profile} --data data/{wildcards.profile} --out models/{wildcards.profile}/backbone --log {log}"
