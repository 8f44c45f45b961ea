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
