rule evaluate:
    """Score a fine-tuned run on the held-out test split."""
    input:
        test=f"{RESULTS}/data/{{model}}/{{task}}/test.parquet",
        stats=f"{RESULTS}/data/{{model}}/{{task}}/stats.json",
        weights=f"{RESULTS}/finetune/{RUN_DIR}/trainable.safetensors",
        record=f"{RESULTS}/finetune/{RUN_DIR}/result.json",
    output:
        metrics=f"{RESULTS}/evaluate/{RUN_DIR}/metrics.json",
        predictions=f"{RESULTS}/evaluate/{RUN_DIR}/predictions.jsonl",
    log:
        f"logs/evaluate/{RUN_DIR}.log",
    benchmark:
        f"benchmarks/evaluate/{RUN_DIR}.tsv"
    conda:
        "../../envs/peftlab.yaml"
    threads: config["threads"]
    resources:
        mem_mb=4000,
        runtime=lambda wildcards, attempt: 30 * attempt,
        gpu=1,
    params:
        model=lambda w: config["models"][w.model],
        mlflow=MLFLOW,
        code=code_of("evaluate"),
    script:
        "../scripts/evaluate.py"
