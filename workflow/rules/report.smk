rule report:
    input:
        sources("report.py", "io.py"),
        evals=eval_dirs,
        backbone="models/{profile}/backbone",
    output:
        md="results/{profile}/zero_shot.md",
        csv="results/{profile}/zero_shot.csv",
        metrics="results/{profile}/zero_shot.json",
        plot="results/{profile}/zero_shot.png",
        loss="results/{profile}/backbone.png",
    log:
        "logs/{profile}/report.log",
    conda:
        "../envs/gram.yaml"
    params:
        methods=config["grid"]["methods"],
        evaluate=section("evaluate"),
        vendors=section("data", "vendors"),
    shell:
        "gram report --params params.yaml --profile {wildcards.profile} --eval results/{wildcards.profile}/eval --backbone models/{wildcards.profile}/backbone --out results/{wildcards.profile} --log {log}"
