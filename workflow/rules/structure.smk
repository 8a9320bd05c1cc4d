# The meta-training data structure: embed -> cluster (CHC) -> tasks, prototypes (gram/embed.py,
# gram/cluster.py, gram/tasks.py, gram/prototypes.py). The corpus is data.vendors.meta's shards.


rule embed:
    input:
        sources(
            "embed.py",
            "backbone.py",
            "data/__init__.py",
            "data/names.py",
            "data/shards.py",
            "images.py",
            "io.py",
            "tensorio.py",
        ),
        shards="data/{profile}/shards",
        backbone="models/{profile}/backbone",
    output:
        directory("data/{profile}/embed"),
    log:
        "logs/{profile}/embed.log",
    conda:
        "../envs/gpu.yaml"
    threads: 4
    resources:
        mem_mb=memory(4000, backbone=4),
        runtime=720,
        gpu=1,
    params:
        embed=section("embed"),
        corpus=section("data", "vendors", "meta"),
        device=section("backbone", "device"),
        dtype=section("backbone", "dtype"),
    shell:
        "gram embed --params params.yaml --profile {wildcards.profile} --data data/{wildcards.profile} --backbone models/{wildcards.profile}/backbone --out data/{wildcards.profile}/embed --log {log}"


rule cluster:
    input:
        sources(
            "cluster.py",
            "backbone.py",
            "data/__init__.py",
            "data/names.py",
            "data/shards.py",
            "embed.py",
            "images.py",
            "io.py",
            "tensorio.py",
        ),
        shards="data/{profile}/shards",
        embed="data/{profile}/embed",
    output:
        directory("data/{profile}/chc"),
    log:
        "logs/{profile}/cluster.log",
    conda:
        "../envs/gpu.yaml"
    threads: 4
    resources:
        mem_mb=memory(4000, embed=3),
        runtime=240,
        gpu=1,
    params:
        cluster=section("cluster"),
        corpus=section("data", "vendors", "meta"),
        device=section("backbone", "device"),
    shell:
        "gram cluster --params params.yaml --profile {wildcards.profile} --data data/{wildcards.profile} --embed data/{wildcards.profile}/embed --out data/{wildcards.profile}/chc --log {log}"


rule tasks:
    input:
        sources(
            "tasks.py",
            "backbone.py",
            "cluster.py",
            "data/__init__.py",
            "data/names.py",
            "data/shards.py",
            "embed.py",
            "images.py",
            "io.py",
            "tensorio.py",
        ),
        chc="data/{profile}/chc",
    output:
        directory("data/{profile}/tasks"),
    log:
        "logs/{profile}/tasks.log",
    conda:
        "../envs/cpu.yaml"
    threads: 1
    resources:
        mem_mb=memory(2000, chc=2),
        runtime=60,
    params:
        tasks=section("tasks"),
    shell:
        "gram tasks --params params.yaml --profile {wildcards.profile} --chc data/{wildcards.profile}/chc --out data/{wildcards.profile}/tasks --log {log}"


rule prototypes:
    input:
        sources(
            "prototypes.py",
            "backbone.py",
            "cluster.py",
            "data/__init__.py",
            "data/names.py",
            "data/shards.py",
            "embed.py",
            "images.py",
            "io.py",
            "regulator.py",
            "tensorio.py",
        ),
        embed="data/{profile}/embed",
        chc="data/{profile}/chc",
    output:
        directory("data/{profile}/prototypes"),
    log:
        "logs/{profile}/prototypes.log",
    conda:
        "../envs/cpu.yaml"
    threads: 1
    resources:
        mem_mb=memory(2000, embed=2),
        runtime=60,
    params:
        prototypes=section("prototypes"),
        corpus=section("data", "vendors", "meta"),
    shell:
        "gram prototypes --params params.yaml --profile {wildcards.profile} --embed data/{wildcards.profile}/embed --chc data/{wildcards.profile}/chc --out data/{wildcards.profile}/prototypes --log {log}"
