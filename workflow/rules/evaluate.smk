rule evaluate:
    """Score a fine-tuned run on the held-out test split."""
    input:
        test=f"{RESULTS}/data/{{model}}/{{task}}/test.parquet",
        stats=f"{RESULTS}/data/{{model}}/{{task}}/stats.json",
        weights=f"{RESULTS}/finetune/{RUN_DIR}/trainable.safetensors",
        record=f"{RESULTS}/finetune/{RUN_DIR}/result.json",
    output:
        metrics=f"{RESULTS}/evaluate/{RUN_DIR}/metrics.json",
    params:
        model=lambda w: config["models"][w.model],
        mlflow=config["mlflow"],
        results_dir=RESULTS,
        code=files_fingerprint([SRC / "evaluate.py", SRC / "metrics.py"]),
    log:
        f"logs/evaluate/{RUN_DIR}.log",
    threads: config["threads"]
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=1,
    conda:
        "../../envs/peftlab.yaml"
    script:
        "../scripts/evaluate.py"
