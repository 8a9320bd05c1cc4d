rule evaluate:
    input:
        sources(
            "evaluate.py",
            "backbone.py",
            "data/__init__.py",
            "data/datasets.py",
            "data/fetch.py",
            "data/fewshot.py",
            "data/names.py",
            "data/paper.py",
            "data/shards.py",
            "images.py",
            "io.py",
        ),
        datasets="data/{profile}/datasets",
        shards="data/{profile}/shards",
        backbone="models/{profile}/backbone",
    output:
        directory("results/{profile}/eval/{method}"),
    log:
        "logs/{profile}/evaluate-{method}.log",
    conda:
        "../envs/gpu.yaml"
    threads: 4
    resources:
        mem_mb=memory(4000, evaluate_images, backbone=4),
        runtime=240,
        gpu=1,
    params:
        evaluate=section("evaluate"),
        protocols=section("protocols"),
        datasets=config["grid"]["datasets"],
        transfer=config["grid"]["transfer"],
        device=section("backbone", "device"),
        dtype=section("backbone", "dtype"),
    shell:
        "gram evaluate --params params.yaml --profile {wildcards.profile} --method {wildcards.method} --data data/{wildcards.profile} --backbone models/{wildcards.profile}/backbone --out results/{wildcards.profile}/eval/{wildcards.method} --log {log}"
