rule download:
    input:
        sources("data", "io.py"),
    output:
        shards=directory("data/{profile}/shards"),
        datasets=directory("data/{profile}/datasets"),
        report="data/{profile}/download.json",
    log:
        "logs/{profile}/download.log",
    conda:
        "../envs/cpu.yaml"
    threads: 1
    resources:
        mem_mb=memory(2000),
        runtime=120,
    params:
        data=section("data"),
    shell:
        "gram download --params params.yaml --profile {wildcards.profile} --out data/{wildcards.profile} --log {log}"
