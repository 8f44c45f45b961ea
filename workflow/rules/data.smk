rule prepare_data:
    """Load a task, make its fixed seeded splits and tokenize them for one model."""
    output:
        train=f"{RESULTS}/data/{{model}}/{{task}}/train.parquet",
        validation=f"{RESULTS}/data/{{model}}/{{task}}/validation.parquet",
        test=f"{RESULTS}/data/{{model}}/{{task}}/test.parquet",
        stats=report(
            f"{RESULTS}/data/{{model}}/{{task}}/stats.json",
            caption="../report/data_stats.rst",
            category="Data",
            labels={"model": "{model}", "task": "{task}"},
        ),
    log:
        "logs/prepare_data/{model}/{task}.log",
    benchmark:
        "benchmarks/prepare_data/{model}/{task}.tsv"
    conda:
        "../../envs/peftlab.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=lambda wildcards, attempt: 30 * attempt,
    params:
        model=lambda w: config["models"][w.model],
        task=lambda w: config["tasks"][w.task],
        data=config["data"],
        code=code_of("prepare_data"),
    script:
        "../scripts/prepare_data.py"
