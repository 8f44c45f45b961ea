rule finetune:
    """Fine-tune one (model, task, method, variant, seed); keep the best validation step."""
    input:
        train=f"{RESULTS}/data/{{model}}/{{task}}/train.parquet",
        validation=f"{RESULTS}/data/{{model}}/{{task}}/validation.parquet",
        stats=f"{RESULTS}/data/{{model}}/{{task}}/stats.json",
        experiment=EXPERIMENT_FILES,
        mask=sift_mask_input,
        tuned=tuned_after,
    output:
        weights=f"{RESULTS}/finetune/{RUN_DIR}/trainable.safetensors",
        record=f"{RESULTS}/finetune/{RUN_DIR}/result.json",
    log:
        f"logs/finetune/{RUN_DIR}.log",
    benchmark:
        f"benchmarks/finetune/{RUN_DIR}.tsv"
    conda:
        "../../envs/peftlab.yaml"
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=lambda wildcards, attempt: 120 * attempt,
        gpu=lambda w: (config["models"][w.model] or {}).get("gpus", 1),
    params:
        model=lambda w: config["models"][w.model],
        training=config["training"],
        # the point tuning selected (None when this variant is not tuned)
        tuned=tuned_point,
        mlflow=MLFLOW,
        code=code_of("finetune"),
    script:
        "../scripts/finetune.py"
