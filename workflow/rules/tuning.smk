rule tune_trial:
    """One point of a method's tuning grid, at the tuning budget, on one tuning seed."""
    input:
        train=f"{RESULTS}/data/{{model}}/{{task}}/train.parquet",
        validation=f"{RESULTS}/data/{{model}}/{{task}}/validation.parquet",
        stats=f"{RESULTS}/data/{{model}}/{{task}}/stats.json",
        experiment=EXPERIMENT_FILES,
        mask=sift_mask_input,
    output:
        # only the validation scores are used: the trial's weights go once it is recorded
        weights=temp(f"{RESULTS}/tune/{TRIAL_DIR}/trainable.safetensors"),
        record=f"{RESULTS}/tune/{TRIAL_DIR}/result.json",
    log:
        f"logs/tune/{TRIAL_DIR}.log",
    benchmark:
        f"benchmarks/tune/{TRIAL_DIR}.tsv"
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
        tuned=trial_point,
        # trials reach MLflow nested under their selection (tune_select logs them)
        mlflow=None,
        code=code_of("finetune"),
    script:
        "../scripts/finetune.py"


checkpoint tune_select:
    """Pick the grid point with the best mean validation score over the tuning seeds; the
    final runs of this (model, task, method, variant) train there."""
    input:
        trials=trial_records,
    output:
        f"{RESULTS}/tune/{SELECTION}",
    log:
        f"logs/tune/{SELECTION}.log",
    conda:
        "../../envs/peftlab.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        points=lambda w: TUNED[(w.method, w.variant)],
        seeds=TUNING_SEEDS,
        budget=config["tuning"]["training"],
        mlflow=MLFLOW,
        code=code_of("tune_select"),
    script:
        "../scripts/tune_select.py"
