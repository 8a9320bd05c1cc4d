rule backbone:
    input:
        sources(
            "backbone.py",
            "data/__init__.py",
            "data/names.py",
            "data/shards.py",
            "images.py",
            "io.py",
        ),
        shards="data/{profile}/shards",
    output:
        directory("models/{profile}/backbone"),
    log:
        "logs/{profile}/backbone.log",
    conda:
        "../envs/gpu.yaml"
    threads: 4
    resources:
        mem_mb=memory(4000, shards=2),
        runtime=480,
        gpu=1,
    params:
        backbone=section("backbone"),
        pretrain_vendors=section("data", "vendors", "pretrain"),
    shell:
        "gram backbone --params params.yaml --profile {wildcards.profile} --data data/{wildcards.profile} --out models/{wildcards.profile}/backbone --log {log}"
