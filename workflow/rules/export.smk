rule export:
    """A completed final run's standard artifacts (config export: all): a peft adapter folder,
    a merged transformers folder, or peftlab's own folder, each reloaded and checked."""
    input:
        test=f"{RESULTS}/data/{{model}}/{{task}}/test.parquet",
        stats=f"{RESULTS}/data/{{model}}/{{task}}/stats.json",
        weights=f"{RESULTS}/finetune/{RUN_DIR}/trainable.safetensors",
        record=f"{RESULTS}/finetune/{RUN_DIR}/result.json",
    output:
        directory(f"{RESULTS}/export/{RUN_DIR}"),
    log:
        f"logs/export/{RUN_DIR}.log",
    conda:
        "../../envs/peftlab.yaml"
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=lambda wildcards, attempt: 30 * attempt,
    params:
        model=lambda w: config["models"][w.model],
        code=code_of("export"),
    script:
        "../scripts/export.py"


rule mlflow_models:
    """The runs' MLflow models and the registered best run of a task (config mlflow.log_model:
    best or all): each run's export logged on its finetune run, the best one registered.
    """
    input:
        summary=f"{RESULTS}/summary.parquet",
        stats=f"{RESULTS}/data/{{model}}/{{task}}/stats.json",
        test=f"{RESULTS}/data/{{model}}/{{task}}/test.parquet",
        predictions=lambda w: task_run_files(w, "evaluate", "predictions.jsonl"),
        weights=lambda w: task_run_files(w, "finetune", "trainable.safetensors"),
        # the export rule's folders when exports are on (else each logged run exports itself)
        exports=lambda w: [
            p
            for p in exports()
            if p.startswith(f"{RESULTS}/export/{w.model}/{w.task}/")
        ],
    output:
        record=f"{RESULTS}/mlflow_models/{{model}}/{{task}}.json",
    log:
        "logs/mlflow_models/{model}/{task}.log",
    conda:
        "../../envs/peftlab.yaml"
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        model=lambda w: config["models"][w.model],
        mode=config["mlflow"]["log_model"],
        mlflow=MLFLOW,
        code=code_of("mlflow_models"),
    script:
        "../scripts/mlflow_models.py"
