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
        "../envs/gram.yaml"
    params:
        data=section("data"),
    shell:
        "gram download --params params.yaml --profile {wildcards.profile} --out data/{wildcards.profile} --log {log}"
