rule finetune:
    """Fine-tune one (model, task, method, variant, seed); keep the best validation step."""
    input:
        **TRAIN_INPUT,
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


# One point of a method's tuning grid, at the tuning budget, on one tuning seed: a finetune job
# (the same resources, script and code) that reads no selection, keeps only its record (the
# weights go once it is recorded) and reaches MLflow nested under its selection (tune_select
# logs it). Params not named here are finetune's.
use rule finetune as tune_trial with:
    input:
        **TRAIN_INPUT,
    output:
        weights=temp(f"{RESULTS}/tune/{TRIAL_DIR}/trainable.safetensors"),
        record=f"{RESULTS}/tune/{TRIAL_DIR}/result.json",
    log:
        f"logs/tune/{TRIAL_DIR}.log",
    benchmark:
        f"benchmarks/tune/{TRIAL_DIR}.tsv"
    params:
        tuned=trial_point,
        mlflow=None,
