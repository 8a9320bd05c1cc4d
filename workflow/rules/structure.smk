# The meta-training data structure: embed -> cluster (CHC) -> tasks, prototypes (gram/embed.py,
# gram/cluster.py, gram/tasks.py, gram/prototypes.py). The corpus is data.vendors.meta's shards.


rule embed:
    input:
        sources("embed.py", "backbone.py", "data/shards.py", "io.py", "tensorio.py"),
        shards="data/{profile}/shards",
        backbone="models/{profile}/backbone",
    output:
        directory("data/{profile}/embed"),
    log:
        "logs/{profile}/embed.log",
    conda:
        "../envs/gram.yaml"
    threads: workflow.cores
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
            "embed.py",
            "backbone.py",
            "data/shards.py",
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
        "../envs/gram.yaml"
    threads: workflow.cores
    params:
        cluster=section("cluster"),
        corpus=section("data", "vendors", "meta"),
        device=section("backbone", "device"),
    shell:
        "gram cluster --params params.yaml --profile {wildcards.profile} --data data/{wildcards.profile} --embed data/{wildcards.profile}/embed --out data/{wildcards.profile}/chc --log {log}"


rule tasks:
    input:
        sources("tasks.py", "cluster.py", "io.py", "tensorio.py"),
        chc="data/{profile}/chc",
    output:
        directory("data/{profile}/tasks"),
    log:
        "logs/{profile}/tasks.log",
    conda:
        "../envs/gram.yaml"
    params:
        tasks=section("tasks"),
    shell:
        "gram tasks --params params.yaml --profile {wildcards.profile} --chc data/{wildcards.profile}/chc --out data/{wildcards.profile}/tasks --log {log}"


rule prototypes:
    input:
        sources("prototypes.py", "cluster.py", "embed.py", "io.py", "tensorio.py"),
        embed="data/{profile}/embed",
        chc="data/{profile}/chc",
    output:
        directory("data/{profile}/prototypes"),
    log:
        "logs/{profile}/prototypes.log",
    conda:
        "../envs/gram.yaml"
    params:
        prototypes=section("prototypes"),
        corpus=section("data", "vendors", "meta"),
    shell:
        "gram prototypes --params params.yaml --profile {wildcards.profile} --embed data/{wildcards.profile}/embed --chc data/{wildcards.profile}/chc --out data/{wildcards.profile}/prototypes --log {log}"
